"""`onetower explore`: a local web page over the public API — neighbours as an image grid, a new item dropped
in and upserted, a user's history, two registered versions side by side. Assets ship in `static/`."""

from service.explorer.config import DEFAULT_EXPLORER_PORT, ExplorerConfig
from service.explorer.server import serve_explorer, start_explorer

__all__ = ["DEFAULT_EXPLORER_PORT", "ExplorerConfig", "serve_explorer", "start_explorer"]
