"""Serve a registered generator over HTTP with Ray Serve, following its registry alias.

    serve run pipelines.serve:app model=models:/sagan-fashion-quickstart@champion
    python pipelines/serve.py --model models:/sagan-fashion-quickstart@champion --port 8000

    GET /sample?class_id=3&seed=7&truncation=0.7   -> image/png (one image)
    GET /grid?classes=0,3,7&n=4&seed=0              -> image/png (one row per class, n columns)
    GET /                                           -> JSON: model, version, size, classes

Why Ray Serve: replicas, CPUs/GPUs per replica and request batching (`@serve.batch`: requests
arriving together share one generator forward pass) come from options, on the same Ray cluster
that trains. Why polling: a `models:/NAME@ALIAS` source is re-resolved every `poll_s` seconds;
when the alias moves, each replica loads the new version beside the old one and swaps a single
reference, so requests in flight finish on the old one and none is dropped. Every response names
the version that drew it (`X-Model-Version`). Validation and rendering are pipelines/png_model.py's,
so this server and `mlflow models serve` return the same bytes for the same request. Bad input:
HTTP 400 with one line naming the field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

from ray import serve

from pipelines.png_model import RequestError, SampleRequest, check_request, grid_png, render

ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
log = logging.getLogger("ray.serve")


@dataclass
class ServeOptions:
    """The app's arguments (`serve run pipelines.serve:app key=value`, strings accepted)."""

    model: str = ""
    tracking_uri: str = ""  # default: $MLFLOW_TRACKING_URI where the app is built
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    device: str = "auto"  # cuda when the replica has a GPU
    poll_s: float = 10.0  # 0: never re-resolve the alias
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_grid: int = 256  # images in one /grid answer

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeOptions:
        """Typed options; ValueError naming the key for an unknown key or a bad value."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in args.items():
            k = key.replace("-", "_")
            if k not in known:
                raise ValueError(f"{key}: unknown option (one of {', '.join(known)})")
            kind = type(getattr(cls(), k))
            try:
                values[k] = kind(raw)
            except (TypeError, ValueError):
                raise ValueError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
        opts = cls(**values)
        if not opts.model:
            raise ValueError("model: required (models:/NAME@champion, models:/NAME/3, runs:/ID/"
                             "generator or a checkpoint path)")
        for k in ("replicas", "max_batch_size", "max_grid"):
            if getattr(opts, k) < 1:
                raise ValueError(f"{k}: must be >= 1, got {getattr(opts, k)}")
        for k in ("cpus_per_replica", "gpus_per_replica", "poll_s", "batch_wait_ms"):
            if getattr(opts, k) < 0:
                raise ValueError(f"{k}: must be >= 0, got {getattr(opts, k)}")
        opts.tracking_uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        return opts


@dataclass(frozen=True)
class Loaded:
    G: Any
    version: str  # registry version, or "" for a source outside the registry
    uri: str


def _int_param(params: Any, name: str, default: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise RequestError(f"{name}: expected an integer, got {raw!r}") from None


def _float_param(params: Any, name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise RequestError(f"{name}: expected a number, got {raw!r}") from None


@serve.deployment
class GeneratorServer:
    def __init__(self, opts: ServeOptions):
        from pipelines.model_io import resolve_device

        self.opts = opts
        self.device = resolve_device(opts.device)
        self.alias = ALIAS_URI.match(opts.model)
        self._draw.set_max_batch_size(opts.max_batch_size)
        self._draw.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000)
        self.current = self._load(self._resolve())
        # this replica's batching so far: how many batches, requests, the largest batch
        self.batches = {"count": 0, "requests": 0, "largest": 0}
        if self.alias and opts.poll_s > 0:
            threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()

    # -- the model and its alias --------------------------------------------------------------
    def _resolve(self) -> tuple[str, str]:
        """(uri to load, version): an alias is pinned to the version it names right now."""
        if not self.alias:
            return self.opts.model, ""
        from mlflow.tracking import MlflowClient

        mv = MlflowClient(self.opts.tracking_uri or None).get_model_version_by_alias(
            self.alias["name"], self.alias["alias"])
        return f"models:/{self.alias['name']}/{mv.version}", str(mv.version)

    def _load(self, target: tuple[str, str]) -> Loaded:
        from pipelines.model_io import load_generator_any

        uri, version = target
        G = load_generator_any(uri, self.device, self.opts.tracking_uri or None).generator
        return Loaded(G, version, uri)

    def _poll(self) -> None:
        """Re-resolve the alias; load a new version beside the old one, then swap."""
        while True:
            time.sleep(self.opts.poll_s)
            try:
                target = self._resolve()
                if target[1] != self.current.version:
                    self.current = self._load(target)
                    log.info("now serving %s", target[0])
            except Exception as exc:  # registry unreachable: keep serving what we have
                log.warning("alias check of %s failed: %s", self.opts.model, exc)

    # -- drawing ------------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _draw(self, reqs: list[SampleRequest]) -> list[tuple[Any, str]]:
        """One forward pass for every request that arrived together; (image or error, version)."""
        loaded = self.current  # the whole batch on one version, even if a swap happens now
        b = self.batches
        b.update(count=b["count"] + 1, requests=b["requests"] + len(reqs),
                 largest=max(b["largest"], len(reqs)))
        n = loaded.G.num_classes
        ok = [i for i, r in enumerate(reqs) if n == 0 or (r.class_id is not None
                                                            and r.class_id < n)]
        images = await asyncio.to_thread(render, loaded.G, [reqs[i] for i in ok], self.device) \
            if ok else []
        out: list[tuple[Any, str]] = [
            (RequestError(f"class_id: out of range for version {loaded.version}"), loaded.version)
        ] * len(reqs)
        for i, x in zip(ok, images, strict=True):
            out[i] = (x, loaded.version)
        return out

    def _headers(self, version: str) -> dict[str, str]:
        return {"X-Model-Version": version, "X-Model-Source": self.opts.model}

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        path = request.url.path
        root = request.scope.get("root_path", "").rstrip("/")  # the app's route prefix
        path = (path[len(root):] if root and path.startswith(root) else path).rstrip("/")
        try:
            if path == "/sample":
                return await self._sample(request.query_params)
            if path == "/grid":
                return await self._grid(request.query_params)
            if path == "":
                cur = self.current
                cfg = cur.G.cfg
                return JSONResponse(
                    {"model": self.opts.model, "version": cur.version, "uri": cur.uri,
                     "image_size": cfg.image_size, "channels": cfg.channels,
                     "num_classes": cfg.num_classes, "batches": self.batches},
                    headers=self._headers(cur.version))
            return Response(f"path: {request.url.path} not found (GET /sample, /grid or /)\n",
                            status_code=404, media_type="text/plain")
        except RequestError as exc:
            return Response(f"{exc}\n", status_code=400, media_type="text/plain")

    def _check(self, params: Any, class_id: Any, seed: Any) -> SampleRequest:
        return check_request(seed, class_id, _float_param(params, "truncation"),
                             self.current.G.num_classes)

    async def _sample(self, params: Any) -> Any:
        from starlette.responses import Response

        from pipelines.png_model import png_bytes

        unknown = set(params) - {"class_id", "seed", "truncation"}
        if unknown:
            raise RequestError(f"{sorted(unknown)[0]}: unknown parameter (class_id, seed, "
                               "truncation)")
        req = self._check(params, _int_param(params, "class_id"), _int_param(params, "seed"))
        image, version = await self._draw(req)
        if isinstance(image, RequestError):
            raise image
        return Response(png_bytes(image), media_type="image/png",
                        headers=self._headers(version))

    async def _grid(self, params: Any) -> Any:
        from starlette.responses import Response

        unknown = set(params) - {"classes", "n", "seed", "truncation"}
        if unknown:
            raise RequestError(f"{sorted(unknown)[0]}: unknown parameter (classes, n, seed, "
                               "truncation)")
        num_classes = self.current.G.num_classes
        n = _int_param(params, "n", 8)
        seed = _int_param(params, "seed", 0)
        raw = params.get("classes")
        try:
            classes = ([int(c) for c in raw.split(",") if c.strip()] if raw
                       else list(range(num_classes)) or [None])
        except ValueError:
            raise RequestError(f"classes: expected a comma list of class ids, got {raw!r}") \
                from None
        if n < 1 or n * len(classes) > self.opts.max_grid:
            raise RequestError(f"n: {n} x {len(classes)} classes must be 1..{self.opts.max_grid} "
                               "images")
        reqs = [self._check(params, c, seed + i) for c in classes for i in range(n)]
        drawn = await asyncio.gather(*(self._draw(r) for r in reqs))
        import torch

        if any(isinstance(x, RequestError) for x, _ in drawn):
            raise next(x for x, _ in drawn if isinstance(x, RequestError))
        versions = sorted({v for _, v in drawn})
        png = grid_png(torch.stack([x for x, _ in drawn]), ncols=n)
        return Response(png, media_type="image/png", headers=self._headers(",".join(versions)))


def _check_alias(opts: ServeOptions) -> None:
    """A models:/NAME@ALIAS that the registry does not know stops the build here, in one line,
    rather than as replicas that fail to start and are retried."""
    m = ALIAS_URI.match(opts.model)
    if not m:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from sagan.errors import one_line

    try:
        MlflowClient(opts.tracking_uri or None).get_model_version_by_alias(m["name"], m["alias"])
    except MlflowException as exc:
        raise ValueError(f"model: {opts.model}: not in the registry at "
                         f"{opts.tracking_uri or 'the default tracking URI'} "
                         f"({one_line(exc, 160)})") from None


def app(args: dict[str, Any]) -> Any:
    """App builder: `serve run pipelines.serve:app model=models:/NAME@champion replicas=2`."""
    opts = ServeOptions.from_args(args)
    _check_alias(opts)
    actor = {"num_cpus": opts.cpus_per_replica, "num_gpus": opts.gpus_per_replica}
    return GeneratorServer.options(num_replicas=opts.replicas,
                                   ray_actor_options=actor).bind(opts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Serve a registered SAGAN generator over HTTP with Ray Serve (PNG images; "
                    "follows a models:/NAME@ALIAS alias as it moves).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="endpoints:\n  GET /sample?class_id=3&seed=7&truncation=0.7  -> image/png\n"
               "  GET /grid?classes=0,3&n=8&seed=0  -> image/png\n  GET /  -> JSON\n"
               "example:\n  python pipelines/serve.py --model "
               "models:/sagan-fashion-quickstart@champion --port 8000")
    d = ServeOptions()
    p.add_argument("--model", required=True, metavar="SRC",
                   help="models:/NAME@ALIAS (followed), models:/NAME/VERSION, runs:/ID/generator")
    p.add_argument("--tracking-uri", default="", help="MLflow server (default: "
                   "$MLFLOW_TRACKING_URI)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica)
    p.add_argument("--gpus-per-replica", type=float, default=d.gpus_per_replica)
    p.add_argument("--device", default=d.device, help="cpu, cuda, auto (default)")
    p.add_argument("--poll-s", type=float, default=d.poll_s,
                   help=f"seconds between alias checks (default {d.poll_s:g}; 0: never)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms)
    p.add_argument("--max-grid", type=int, default=d.max_grid)
    p.add_argument("--name", default="sagan", help="Serve application name (default sagan)")
    p.add_argument("--working-dir", metavar="DIR",
                   help="upload this checkout to the replicas (a cluster without the package)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = [f.name for f in fields(ServeOptions)]
    try:
        application = app({k: getattr(args, k) for k in keys if hasattr(args, k)})
    except ValueError as exc:
        print(f"serve.py: error: {exc}", file=sys.stderr)
        return 2
    from pipelines.ray_cluster import connect

    env = None
    if args.working_dir:
        env = {"working_dir": args.working_dir,
               "excludes": [".venv", ".git", "data", "runs", "mlruns", ".state", "bench/results",
                            "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"]}
    connect(runtime_env=env)
    serve.start(http_options={"host": args.host, "port": args.port})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(application, name=args.name, route_prefix="/")
        print(json.dumps({"serving": args.model, "url": f"http://{args.host}:{args.port}/"}),
              flush=True)
        stop.wait()
    finally:
        try:
            serve.delete(args.name)
        except Exception as exc:  # Serve already shut down (e.g. by `serve shutdown`)
            print(f"serve.py: app {args.name} not deleted: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
