"""Screenshots of a search in the Prefect UI, taken the way a user sees it.

Usage::

    python deployments/ui_screenshots.py --api-url http://127.0.0.1:4200/api --out /tmp/ui-shots
        [--flow-run-id ID]     # an `evolve` flow run; default: the latest one that started
        [--generation N]       # which generation-<N> subflow; default: the last one
        [--ui v1|v2|v1,v2]     # which Prefect UI; default: the one the server opens by default
        [--chromium PATH]      # default: $EVOMERGE_CHROMIUM, then chromium-headless-shell/chromium on PATH

It finds the evolve run, its generation subflow runs and their artifacts through the REST API,
opens each page in headless Chromium (viewport 1400x1000), waits until the page is idle and
shows a text it must show (the run's name, the artifact's key), and writes one PNG per page:

- ``<ui>-evolve-run.png``, ``<ui>-evolve-artifacts.png``: the evolve run and its Artifacts tab;
- ``<ui>-generation-<n>-artifacts.png``: the generation subflow run, Artifacts tab;
- ``<ui>-artifact-<type>-<key>.png``: the latest version of each artifact of those runs (the
  candidates table, the best-config markdown, the progress, any plot).

What to look at: the run pages show state and subflows; the table has one row per candidate
with fitness and metrics; the markdown shows the best configuration; the progress page a
percentage; a plot (an image artifact or markdown ``![..](data:image/png;base64,..)``) shows as a
picture. Both UIs (Prefect 3.9) render data: URLs in image artifacts and in markdown; under an
image artifact they also print the whole URL as a link, which runs off the page.

Chromium (Playwright's own browser download is not reachable here; Debian's build works)::

    pip install playwright                       # the Python driver (bundles its node driver)
    apt-get update && apt-get install -y chromium-headless-shell fonts-liberation
    # -> /usr/bin/chromium-headless-shell, found on PATH

The server must tell the browser the right API address: start it with PREFECT_UI_API_URL (or
PREFECT_API_URL) set to the address it serves; ``--port`` alone leaves the UI calling port 4200
(a blank page, "Can't connect to Server API"). This script stops with that message when the API
that ``/ui-settings`` names does not answer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

import httpx

VIEWPORT = {"width": 1400, "height": 1000}
MAX_HEIGHT = 6000  # a long page is cut here
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def find_chromium(explicit: str | None) -> str | None:
    """The Chromium to drive; None lets Playwright use its own downloaded browser."""
    path = explicit or os.environ.get("EVOMERGE_CHROMIUM")
    if path:
        return path
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


class Api:
    def __init__(self, api_url: str):
        self.http = httpx.Client(base_url=api_url.rstrip("/"), timeout=30)

    def post(self, path: str, body: dict) -> list[dict]:
        response = self.http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def evolve_run(self, flow_run_id: str | None) -> dict:
        if flow_run_id:
            response = self.http.get(f"/flow_runs/{flow_run_id}")
            if response.status_code == 404:
                sys.exit(f"no flow run {flow_run_id} on this server")
            response.raise_for_status()
            return response.json()
        runs = self.post(
            "/flow_runs/filter",
            {
                "flows": {"name": {"any_": ["evolve"]}},
                "flow_runs": {"start_time": {"is_null_": False}},
                "sort": "START_TIME_DESC",
                "limit": 1,
            },
        )
        if not runs:
            sys.exit("no started flow run of flow 'evolve' on this server")
        return runs[0]

    def subflow_runs(self, parent_id: str) -> list[dict]:
        return self.post(
            "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}, "sort": "START_TIME_ASC"}
        )

    def latest_artifacts(self, flow_run_id: str) -> list[dict]:
        """The newest version of each keyed artifact of one flow run."""
        artifacts = self.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "CREATED_DESC"}
        )
        latest: dict[str, dict] = {}
        for artifact in artifacts:
            latest.setdefault(artifact["key"] or artifact["id"], artifact)
        return list(latest.values())


def generation_number(run: dict) -> int:
    match = re.fullmatch(r"generation-(\d+)", run["name"])
    return int(match.group(1)) if match else -1


def plan_pages(api: Api, ui_base: str, prefix: str, ui: str, evolve: dict, generation: int | None):
    """(file name, URL, text the page must show, tab to open or None) for one UI."""
    run_url = f"{ui_base}{prefix}/runs/flow-run"
    pages = [
        (f"{ui}-evolve-run", f"{run_url}/{evolve['id']}", evolve["name"], None),
        (f"{ui}-evolve-artifacts", f"{run_url}/{evolve['id']}?tab=Artifacts", evolve["name"], "Artifacts"),
    ]
    runs_with_artifacts = [evolve]
    generations = [r for r in api.subflow_runs(evolve["id"]) if generation_number(r) >= 0]
    if generation is not None:
        generations = [r for r in generations if generation_number(r) == generation]
    if generations:
        run = max(generations, key=generation_number)
        pages.append(
            (f"{ui}-{run['name']}-artifacts", f"{run_url}/{run['id']}?tab=Artifacts", run["name"], "Artifacts")
        )
        runs_with_artifacts.append(run)
    else:
        print("no generation-<n> subflow run found", file=sys.stderr)
    for run in runs_with_artifacts:
        for artifact in api.latest_artifacts(run["id"]):
            key = artifact["key"] or artifact["id"]
            pages.append(
                (
                    f"{ui}-artifact-{artifact['type']}-{key}",
                    f"{ui_base}{prefix}/artifacts/artifact/{artifact['id']}",
                    key,
                    None,
                )
            )
    return pages


def screenshot(page, url: str, text: str, tab: str | None, path: Path) -> None:
    page.goto(url, wait_until="networkidle")
    page.wait_for_function("t => document.body.innerText.includes(t)", arg=text, timeout=30_000)
    if tab:  # the v1 UI drops ?tab= while the run loads: open the tab by hand
        page.get_by_role("tab", name=tab).or_(page.get_by_text(tab, exact=True)).first.click()
    page.wait_for_load_state("networkidle")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
    # The run graph (a canvas) pans and zooms into place for a while after its data arrives.
    page.wait_for_timeout(4000 if "/flow-run/" in url else 1000)
    # Both UIs scroll inside a panel, which full_page does not see: grow the window to fit it.
    height = page.evaluate("Math.max(...Array.from(document.querySelectorAll('*'), e => e.scrollHeight))")
    if height > VIEWPORT["height"]:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": min(height, MAX_HEIGHT)})
        page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--api-url", required=True, help="Prefect API URL, e.g. http://127.0.0.1:4200/api")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNG files")
    parser.add_argument("--flow-run-id", help="the evolve flow run (default: the latest that started)")
    parser.add_argument("--generation", type=int, help="the generation subflow to show (default: the last)")
    parser.add_argument("--ui", help="v1, v2 or v1,v2 (default: the server's default UI)")
    parser.add_argument("--chromium", help="Chromium executable (default: $EVOMERGE_CHROMIUM, then PATH)")
    args = parser.parse_args(argv)

    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    api_url = args.api_url.rstrip("/")
    ui_base = api_url.removesuffix("/api")
    settings = httpx.get(f"{ui_base}/ui-settings", timeout=30).json()
    ui_api_url = settings.get("api_url") or api_url
    try:  # the browser calls the API the server names here; the UI is blank when it is wrong
        httpx.get(f"{ui_api_url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        sys.exit(
            f"the UI at {ui_base} calls the API at {ui_api_url}, which does not answer ({exc}): "
            "start the server with PREFECT_UI_API_URL set to its own address"
        )
    uis = (args.ui or settings.get("default_ui") or "v1").split(",")

    api = Api(api_url)
    evolve = api.evolve_run(args.flow_run_id)
    args.out.mkdir(parents=True, exist_ok=True)
    chromium = find_chromium(args.chromium)
    written, failed = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        for ui in uis:
            prefix = (settings.get(f"{ui}_base_url") or ("/" if ui == "v1" else "/v2")).rstrip("/")
            for name, url, text, tab in plan_pages(api, ui_base, prefix, ui, evolve, args.generation):
                page = browser.new_page(viewport=VIEWPORT)
                path = args.out / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".png")
                try:
                    screenshot(page, url, text, tab, path)
                    written.append(path)
                    print(f"{path}  <- {url}")
                except PlaywrightError as exc:  # a page that does not render is a finding, not the end
                    failed.append(name)
                    print(f"FAILED {name} ({url}): {exc}", file=sys.stderr)
                    with contextlib.suppress(PlaywrightError):
                        page.screenshot(path=str(path.with_suffix(".failed.png")), full_page=True)
                finally:
                    page.close()
        browser.close()
    return 1 if failed or not written else 0


if __name__ == "__main__":
    sys.exit(main())
