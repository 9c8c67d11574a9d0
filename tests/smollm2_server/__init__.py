"""Live SmolLM2 tests that share one engine: vLLM's OpenAI server in its default dtype on the
spec of every site kind plus the bundled harm monitor (conftest.py), started once for the
package and stopped after its last test."""
