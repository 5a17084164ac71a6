"""What the project's own commands (``avl-bench``, ``avl-diff``, the examples) print: their
results, not notices of the libraries underneath that the command's user cannot act on.
A user's own program is left alone: the backend adds only its own documented warnings."""

from __future__ import annotations

import logging

# logger -> message beginnings to drop
_LIBRARY_NOTICES = {
    # every LLaVA-style prefill breaks Dynamo's graph at transformers' check that the image
    # features fill the image placeholders (a Tensor.item()): harmless, and 30 lines long
    "torch._dynamo.variables.tensor": ("Graph break from `Tensor.item()`",),
}


class _DropNotices(logging.Filter):
    def __init__(self, beginnings: tuple[str, ...]) -> None:
        super().__init__()
        self.beginnings = beginnings

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.beginnings)


def hide_library_notices() -> None:
    """Drop the known library notices from this process's logs (for the commands' mains)."""
    for name, beginnings in _LIBRARY_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(beginnings))
