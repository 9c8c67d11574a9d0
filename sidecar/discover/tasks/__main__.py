"""``python -m sidecar.discover.tasks``: rebuild the shipped task files."""

from sidecar.discover.tasks import main

main()
