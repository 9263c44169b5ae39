"""The live dashboard: the report's views served from a run's tables, the mask gallery made page by page.

For runs too large for one file. The figures are computed again only when a table has a new commit (a
running pipeline's progress shows on the next visit); gallery pages and their pictures are made when
asked for, one bound query per page, nothing preloaded. It listens on 127.0.0.1 unless told otherwise:
its pages show the run's data to whoever can reach them.
"""

from __future__ import annotations

import html
import socket
import threading
from collections import OrderedDict
from functools import cache
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

import duckdb
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Response
from fastapi.responses import HTMLResponse
from plotly.offline import get_plotlyjs

from sam3_engine.dashboards.gallery import Tile, draw_masks, jpeg, placeholder, read_image, render_gallery, verdict_groups
from sam3_engine.dashboards.report import SERVED_POLICY, STYLE, gather, render
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import TABLES

PLOTLY_PATH = "/assets/plotly.min.js"
THUMBNAIL_SIDE = 256
FULL_SIDE = 1024
CACHED_PAIRS = 512
"""Pairs whose masks stay in memory after their gallery page, so that its pictures need no query of their own."""

_HEADERS = {"Content-Security-Policy": SERVED_POLICY, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class Dashboard:
    """One run's views: the figures, cached per table commit, and gallery pages, each from one bound query."""

    def __init__(
        self,
        run_url: str,
        storage_config: StorageConfig | None = None,
        verifier: str | None = None,
        min_positives: int = 10,
        page_size: int = 12,
    ):
        self.store = TableStore(run_url, storage_config)
        self.verifier = verifier
        self.min_positives = min_positives
        self.page_size = page_size
        self._lock = threading.Lock()
        """One DuckDB connection, one query at a time (a cursor would not see the run's views)."""
        self._versions: tuple[int, ...] | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._overview: str | None = None
        self._pairs: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def _versions_now(self) -> tuple[int, ...]:
        return tuple(-1 if (table := self.store.open(name)) is None else table.version() for name in TABLES)

    def _refresh(self) -> None:
        """A new snapshot of the run when any table has a new commit since the last (call with the lock held)."""
        versions = self._versions_now()
        if versions == self._versions and self._con is not None:
            return
        if self._con is not None:
            self._con.close()
        self._con = connect(self.store)
        self._versions = versions
        self._overview = None
        self._pairs.clear()

    def overview(self) -> str:
        with self._lock:
            self._refresh()
            if self._overview is None:
                data = gather(self.store.run_url, self.store.storage_config, self.verifier, self.min_positives, gallery_per_concept=0)
                data.gallery = _gallery_index(data.coverage)
                self._overview = render(data, plotly_src=PLOTLY_PATH, concept_link=lambda row: _gallery_url(row["concept_id"]))
            return self._overview

    def gallery_page(self, concept_id: str, page: int) -> str | None:
        """Page ``page`` (from 0) of a concept's gallery; None when it has no pair with masks there (none at all, or past the end)."""
        rows = self._query(concept_id, page * self.page_size, self.page_size)
        if not rows:
            return None
        total = rows[0]["pairs_with_masks"]
        by_pair: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        for row in rows:
            by_pair.setdefault(row["pair_id"], []).append(row)
        with self._lock:
            for pair_id, pair_rows in by_pair.items():
                self._remember(pair_id, pair_rows)
        tiles = [
            Tile(
                pair_rows[0]["phrase"],
                pair_id,
                label,
                tuple(chosen),
                _tile_url(concept_id, pair_id, label, THUMBNAIL_SIDE),
                _tile_url(concept_id, pair_id, label, FULL_SIDE),
            )
            for pair_id, pair_rows in by_pair.items()
            for label, chosen in verdict_groups(pair_rows)
        ]
        phrase = rows[0]["phrase"]
        pages = max(1, -(-total // self.page_size))
        return _page(f"Mask gallery: {phrase}", render_gallery(tiles) + _pager(concept_id, page, pages, total))

    def tile(self, concept_id: str, pair_id: str, label: str, side: int) -> bytes | None:
        """A JPEG of the pair's image with its accepted masks (``label`` "accepted") or the others drawn; None for no such masks."""
        with self._lock:
            rows = self._pairs.get(pair_id)
        if not rows or rows[0]["concept_id"] != concept_id:
            rows = self._query(concept_id, 0, None, pair_id)
            with self._lock:
                self._remember(pair_id, rows)
        chosen = dict(verdict_groups(rows)).get(label)
        if not chosen:
            return None
        image = read_image(chosen[0]["uri"], self.store.storage_config)
        return jpeg(placeholder(side) if image is None else draw_masks(image, chosen), side)

    def _query(self, concept_id: str, offset: int, limit: int | None, pair_id: str | None = None) -> list[dict[str, Any]]:
        params = {"concept_id": concept_id, "offset": offset, "page_size": limit, "pair_id": pair_id, "verifier": self.verifier}
        with self._lock:
            self._refresh()
            rows = self._con.sql(named_query("gallery_page"), params=params).to_arrow_table().to_pylist()
        return [{**row, "concept_id": concept_id} for row in rows]

    def _remember(self, pair_id: str, rows: list[dict[str, Any]]) -> None:
        self._pairs[pair_id] = rows
        self._pairs.move_to_end(pair_id)
        while len(self._pairs) > CACHED_PAIRS:
            self._pairs.popitem(last=False)


def create_app(dashboard: Dashboard) -> FastAPI:
    """The dashboard's web app: every value from the URL reaches DuckDB as a bound parameter, and every page is escaped."""
    app = FastAPI(title="sam3-engine dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def overview() -> HTMLResponse:
        return HTMLResponse(dashboard.overview(), headers=_HEADERS)

    @app.get("/gallery/{concept_id}", response_class=HTMLResponse)
    def gallery(concept_id: str, page: Annotated[int, Query(ge=0)] = 0) -> HTMLResponse:
        body = dashboard.gallery_page(concept_id, page)
        if body is None:
            raise HTTPException(404, "no pair of this concept has masks in the run" + (f" on page {page + 1}" if page else ""))
        return HTMLResponse(body, headers=_HEADERS)

    @app.get("/tile/{concept_id}/{pair_id}.jpg")
    def tile(
        concept_id: str,
        pair_id: str,
        masks: Literal["accepted", "others"],
        side: Annotated[int, Query(ge=32, le=2048)] = THUMBNAIL_SIDE,
    ) -> Response:
        picture = dashboard.tile(concept_id, pair_id, masks, side)
        if picture is None:
            raise HTTPException(404, "no such masks")
        return Response(picture, media_type="image/jpeg", headers={**_HEADERS, "Cache-Control": "max-age=300"})

    @app.get(PLOTLY_PATH)
    def plotly() -> Response:
        return Response(_plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    return app


def listen(host: str = "127.0.0.1", port: int = 8765) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: any free one): a taken port is an OSError before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the queue from now on, even before the app has started
    except OSError:
        sock.close()
        raise
    return sock


def server(dashboard: Dashboard) -> uvicorn.Server:
    """The dashboard's web server; ``server(d).run(sockets=[listen()])`` serves until interrupted (Ctrl-C, SIGTERM)."""
    return uvicorn.Server(uvicorn.Config(create_app(dashboard), log_level="warning"))


@cache
def _plotly_js() -> bytes:
    return get_plotlyjs().encode()


def _gallery_url(concept_id: str, page: int = 0) -> str:
    return f"/gallery/{quote(concept_id, safe='')}" + (f"?page={page}" if page else "")


def _tile_url(concept_id: str, pair_id: str, label: str, side: int) -> str:
    return f"/tile/{quote(concept_id, safe='')}/{quote(pair_id, safe='')}.jpg?" + urlencode({"masks": label, "side": side})


def _gallery_index(coverage: list[dict[str, Any]], shown: int = 100) -> str:
    """Links to the galleries of the concepts with the most masks (every concept's name in the coverage table links too)."""
    with_masks = sorted((row for row in coverage if row["masks"]), key=lambda row: (-row["masks"], row["phrase"]))[:shown]
    links = "".join(
        f'<li><a href="{html.escape(_gallery_url(row["concept_id"]))}">{html.escape(row["phrase"])}</a></li>' for row in with_masks
    )
    return (
        f'<section id="gallery"><h2>Mask gallery</h2><p>The {len(with_masks)} concepts with the most masks:</p>'
        f'<ul class="concepts">{links}</ul></section>'
    )


def _pager(concept_id: str, page: int, pages: int, total: int) -> str:
    previous = f'<a href="{html.escape(_gallery_url(concept_id, page - 1))}">previous</a>' if page > 0 else ""
    following = f'<a href="{html.escape(_gallery_url(concept_id, page + 1))}">next</a>' if page + 1 < pages else ""
    return f'<nav id="pager">{previous} page {page + 1} of {pages} ({total} pairs with masks) {following} <a href="/">overview</a></nav>'


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="{SERVED_POLICY}">
<style>{STYLE}</style></head><body>{body}</body></html>
"""
