"""`onetower explore`: the neighbour explorer, a local web page over a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from onetower.settings import (
    EXPLORER_HOST,
    EXPLORER_PORT,
    INDEX_ROOT,
    TARGET,
    TLS_ROOT_CERT,
    IndexRootOpt,
    OptionalCatalogOpt,
    TargetOpt,
    TokenOpt,
    TrackingOpt,
)
from service.explorer import ExplorerConfig, serve_explorer

console = Console()

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command()
def explore(
    target: TargetOpt = TARGET.default,
    catalog: OptionalCatalogOpt = None,
    token: TokenOpt = None,
    tls_root_cert: Annotated[Path | None, TLS_ROOT_CERT.option(exists=True, dir_okay=False)] = None,
    tracking_uri: TrackingOpt = None,
    index_root: IndexRootOpt = INDEX_ROOT.default,
    explorer_host: Annotated[str, EXPLORER_HOST.option()] = EXPLORER_HOST.default,
    explorer_port: Annotated[int, EXPLORER_PORT.option(min=0, max=65535)] = EXPLORER_PORT.default,
    cache_dir: Annotated[Path, typer.Option(help="Model files of the versions the compare view starts.")]
    = Path(".onetower-cache"),
) -> None:
    """Open a web page on a running server: neighbours as an image grid, a new item dropped in, a user's history,
    two registered versions side by side.

    The page is a client of the gRPC API (--target, with --token and --tls-root-cert as the server wants);
    titles and images of catalog items come from --catalog (images are served only from its folder). The
    compare view starts a read-only server per registered version that has a published index under
    --index-root (registry: --tracking-uri). Ctrl-C stops it.

    Example: onetower explore --target 127.0.0.1:50051 --catalog onetower-demo/data/catalog.parquet
    """
    try:
        config = ExplorerConfig(target=target, catalog=catalog, token=token,
                                root_cert=tls_root_cert.read_bytes() if tls_root_cert else None,
                                host=explorer_host, port=explorer_port, tracking_uri=tracking_uri,
                                index_root=index_root, cache_dir=cache_dir)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if explorer_host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning[/]: the explorer listens on {explorer_host}; it has no login of its own")
    serve_explorer(config, lambda url: console.print(f"[green]explorer[/] on {url} (service {target}); Ctrl-C stops"))
