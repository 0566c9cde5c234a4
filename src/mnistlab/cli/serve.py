"""`mnistlab serve`: the drawing page and the JSON API, served by uvicorn."""

from __future__ import annotations

import click

from .options import root_option


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--model",
    "model_spec",
    metavar="RUN_OR_WEIGHTS",
    default=None,
    help="A run folder or weights file. Default: the model bundled with mnistlab.",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(0, 1024, min_open=True),
    default=5.0,
    show_default=True,
    help="Largest image accepted, in megabytes (10^6 bytes).",
)
@click.option("--runs-dir", default="runs", show_default=True,
              help="Runs shown at /runs, and where runs started from the page go.")
@click.option("--allow-train", is_flag=True,
              help="Let the page start, stop and resume runs even when not on a loopback address.")
@root_option
def serve(host: str, port: int, model_spec: str | None, max_upload_mb: float, runs_dir: str,
          allow_train: bool, root: str | None) -> None:
    """Serve a page to draw digits on and watch the model read them, plus a JSON API; /runs
    shows the runs and trains new ones (from loopback, or with --allow-train).

    Stops cleanly on Ctrl-C or SIGTERM.
    """
    import signal

    # Take the port before the slow imports, so a port in use fails at once; connections that
    # arrive meanwhile wait in the listen backlog.
    sock = _listen(host, port)
    bound_port = sock.getsockname()[1]

    import uvicorn

    from ..errors import MnistlabError
    from ..predict import Predictor
    from ..serve import create_app
    from ..serve_runs import train_allowed

    try:
        predictor = Predictor.load(model_spec)
        app = create_app(predictor, max_upload_bytes=int(max_upload_mb * 1_000_000),
                         runs_dir=runs_dir, train_allowed=train_allowed(host, allow_train),
                         root=root)
    except BaseException:
        sock.close()
        raise
    shown_host = f"[{host}]" if ":" in host else host

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        # Longer than clients keep idle connections (httpx: 5 s, uvicorn's default too), so a
        # client never sends a request on a connection the server is closing at that moment.
        timeout_keep_alive=65,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    url = f"http://{shown_host}:{bound_port}/"
    name = predictor.info.get("name") or "model"
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal into the handler
    # that was installed before it; these record it instead, so a requested stop exits 0.
    stopped_by: list[int] = []

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if stopped_by:  # a signal that came before uvicorn was listening for them
                self.should_exit = True
                return
            click.echo(f"mnistlab: serving {name} at {url}")
            click.echo("mnistlab: API docs at /docs; press Ctrl-C to stop")

    server = Server(config)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise MnistlabError("the server failed to start; see the messages above")
    click.echo("mnistlab: stopped")


def _listen(host: str, port: int):
    """A listening socket on host:port, or one clear error line (port in use, bad address)."""
    import errno
    import socket

    from ..errors import MnistlabError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise MnistlabError(f"cannot listen on {host!r}: {e.strerror}; check --host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MnistlabError(
                f"port {port} on {host} is already in use; stop the other server or choose "
                "another port with --port"
            ) from None
        raise MnistlabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
