"""The reference model's tokenizer: a small byte-level BPE trained on the training text.

Small on purpose (512 entries: the 256 bytes and 253 merges): the induction tests draw random
tokens from the whole vocabulary, and the random token embeddings that the layer-1 heads
match must stay distinguishable in a 256-wide residual stream.
Every encoding starts with ``<s>`` (the post-processor adds it), as Llama's tokenizer does,
so vLLM and Hugging Face feed the model the same ids for the same text prompt.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2
VOCAB_SIZE = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (same texts in the same order -> same merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def special_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, ...]:
    """Ids of the special tokens, which random-token spans must never contain."""
    return tuple(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
