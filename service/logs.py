"""Log output for the commands: rich text for people, or one JSON object per line for log shippers.

Library code logs with `extra={...}` (request_id, rpc, code, model_version, ...); the JSON format
puts those fields beside `ts`, `level`, `logger` and `msg`, the text format shows the message only.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

FORMATS = ("text", "json")
QUIET_LOGGERS = ("mlflow", "alembic", "pytorch_lightning", "lightning_fabric", "faiss.loader", "urllib3", "httpx",
                 "git")
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, msg, the `extra` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(log_format: str = "text", level: str = "INFO") -> None:
    """Replace the root handlers with one on stderr in `log_format` ("text": rich, "json": JSON lines).

    Raises:
        ValueError: an unknown format or level.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} must be one of {list(FORMATS)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} must be DEBUG, INFO, WARNING or ERROR")
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, numeric))


def set_format(log_format: str | None) -> None:
    """Switch the output format (a command's `--log-format`), keeping the level; None keeps both."""
    if log_format is not None:
        configure_logging(log_format, logging.getLevelName(logging.getLogger().level))
