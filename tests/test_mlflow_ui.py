"""The MLflow UI as researchers use it: a real tracking server and its UI on loopback, a real
sweep logged to it, and the pages rendered by headless Chromium (the DOM after the UI's
JavaScript ran), checked for what they must show. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import browser
from pact_ray.tracking.server import start_server
from pact_ray.tracking.tags import ROLE_TAG
from pact_ray.tune.manifest import MANIFEST
from pact_ray.tune.sweep import run_sweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1600,1100", "--virtual-time-budget=20000"]


def rendered(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The page's visible text after its scripts ran (and a screenshot when asked, of the same
    load: one Chromium start for both)."""
    extra = ["--dump-dom", *([f"--screenshot={screenshot}"] if screenshot else [])]
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", out, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_mlflow_ui_shows_distinct_runs_and_the_sweep_summary(tmp_path, ray_address, capsys):
    server = start_server(tmp_path / "tracking")
    try:
        rc = run_sweep("stage1", ["--model", "tiny", "--profile", "smoke", "--variants", "baseline,ot_first", "--seeds", "0,1",
                                  "--name", "ui", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", server.uri, "--quiet"])
        out = capsys.readouterr().out
        assert rc == 0, out
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("pact-ray/stage1_router")
        runs = client.search_runs([exp.experiment_id])
        children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
        [parent] = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
        names = sorted(r.info.run_name for r in children)
        assert names == ["baseline s0", "baseline s1", "ot_first s0", "ot_first s1"]

        ARTIFACTS.mkdir(exist_ok=True)
        profile = tmp_path / "chrome"
        base = f"{server.uri}/#/experiments/{exp.experiment_id}"
        # The experiment's training runs (the link the sweep prints), with the sweep's parent run.
        page = rendered(f"{base}/runs", profile, ARTIFACTS / "mlflow_ui_runs.png")
        assert "Run Name" in page and parent.info.run_name in page and f"{len(runs)} matching runs" in page
        # The runs side by side: every child's name, each one distinct.
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in children]))
        compare = f"{server.uri}/#/compare-runs?runs={ids}&experiments=" + urllib.parse.quote(json.dumps([exp.experiment_id]))
        page = rendered(compare, profile, ARTIFACTS / "mlflow_ui_compare.png")
        shown = re.search(r"Run Name: (.*?) Start Time", page).group(1)
        assert sorted(re.findall(r"(?:baseline|ot_first) s\d", shown)) == names
        # The parent run's artifacts list the sweep's page, tables and plots.
        artifacts = f"{base}/runs/{parent.info.run_id}/artifacts/summary/index.html"
        shot = ARTIFACTS / "mlflow_ui_parent_artifacts.png"
        page = rendered(artifacts, profile, shot)
        for name in ("index.html", "ablation_summary.csv", "route_status.json", "stage1_val_delta.png"):
            assert name in page, name
        pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
        assert pixels.shape[:2] == (1100, 1600) and pixels.std() > 10

        # index.html inside MLflow's artifact viewer (a sandboxed frame on a blob: URL): every
        # plot loaded (inlined, so nothing relative to resolve) under its caption.
        def page_frame(frames):
            return next((f for f in frames if f["url"].startswith("blob:") and "Plots" in f["text"]), None)

        def loaded(frames):
            f = page_frame(frames)
            return f is not None and f["images"] and all(i["complete"] for i in f["images"])

        shot = ARTIFACTS / "mlflow_ui_parent_index_html.png"
        frame = page_frame(browser.frames(artifacts, tmp_path / "cdp", screenshot=shot, ready=loaded, scroll_to="plots"))
        assert frame is not None, "the artifact viewer did not show index.html"
        images = frame["images"]
        assert len(images) >= 3 and all(i["width"] > 100 and i["height"] > 100 for i in images), images
        assert all(i["src"].startswith("data:image/png") for i in images)
        assert any("val" in i["alt"] for i in images) and "Route status" in frame["text"] and "Ablation table" in frame["text"]
        assert "baseline" in frame["text"] and "ot first" in frame["text"].lower()
        # The picture: the viewer's pane (right of the file tree), scrolled to the plots, shows
        # them: areas of saturated colour (bars, intervals), which broken images and text lack.
        pane = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)[150:, 460:1180]
        colour = pane.max(axis=2) - pane.min(axis=2) > 60
        assert pane.std() > 10 and colour.sum() > 5000, colour.sum()

        # The link the sweep prints opens the experiment filtered to this sweep's runs: another
        # sweep's run in the same experiment is left out.
        link = re.search(r"open (\S+) in a browser", out).group(1)
        assert link.startswith(f"{base}/runs?searchFilter=")
        client.create_run(exp.experiment_id, run_name="other sweep", tags={"sweep": "other"})
        assert f"{len(runs) + 1} matching runs" in rendered(f"{base}/runs", profile)
        page = rendered(link, profile)
        assert f"{len(runs)} matching runs" in page and "other sweep" not in page
        filtered = urllib.parse.parse_qs(link.split("?", 1)[1])["searchFilter"][0]
        assert len(client.search_runs([exp.experiment_id], filter_string=filtered)) == len(runs)
        # The parent's name starts with the sweep's short id (the runs list shows ~18 characters).
        manifest = json.loads((tmp_path / "runs" / "ui" / MANIFEST).read_text())
        assert parent.info.run_name == f"{manifest['uid'][:6]} ui" and parent.data.tags["sweep"] == "ui"
        # Child runs carry only what describes them: no fault injection, no empty tags.
        for r in children:
            assert not [k for k in r.data.params if k.startswith("fail_")]
            assert all(v != "" for v in r.data.tags.values()), r.data.tags
    finally:
        server.stop()
