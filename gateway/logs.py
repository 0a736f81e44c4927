"""Logging of the command line: with a log file, everything goes to the file and the
terminal gets only what a person must see (WARNING and above, and INFO records marked
`extra={"terminal": True}`), one short line each with a stable prefix."""

from __future__ import annotations

import logging
import sys

FULL_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LINE_LIMIT = 300


def one_line(text: str, limit: int = LINE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _ForTerminal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "terminal", False)


class _TerminalFormatter(logging.Formatter):
    """`prefix message`; each line of a multi-line message (a config error lists one
    problem per line) becomes its own prefixed line; an exception adds its last line."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        lines = [line for line in record.getMessage().splitlines() if line.strip()]
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            lines[-1:] = [f"{lines[-1] if lines else ''} {type(exc).__name__}: {exc}".strip()]
        return "\n".join(self.prefix + one_line(line) for line in lines)


def configure(level: str, log_file: str | None = None, prefix: str = "infergate: ") -> None:
    """Without `log_file`: every record at `level` to stderr in full. With it: every record
    to the file, the terminal's share to stderr, and uncaught exceptions logged too (the
    traceback in the file, one line in the terminal)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if log_file is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FULL_FORMAT))
        root.addHandler(handler)
        return
    to_file = logging.FileHandler(log_file, delay=True)  # opened at the first record
    to_file.setFormatter(logging.Formatter(FULL_FORMAT))
    terminal = logging.StreamHandler(sys.stderr)
    terminal.addFilter(_ForTerminal())
    terminal.setFormatter(_TerminalFormatter(prefix))
    root.addHandler(to_file)
    root.addHandler(terminal)

    def excepthook(kind, value, tb) -> None:
        logging.getLogger("infergate").critical("stopped by an error", exc_info=(kind, value, tb))

    sys.excepthook = excepthook
