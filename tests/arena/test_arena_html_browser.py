"""The HTML report opens in a real browser: headless Chromium loads report.html and a probe script measures what
the browser laid out (every table has rows and a size on the page, every plot decodes to a real image).

Skipped when no Chromium binary is on PATH (``apt-get install -y chromium`` on Debian/Ubuntu; a fresh CI machine
may not have it)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from lorakit.arena import write_report

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install -y chromium)")

PROBE = """<pre id='probe'></pre><script>
window.addEventListener('load', () => {
  const t = [...document.querySelectorAll('table')].map(x => ({rows: x.rows.length, w: x.offsetWidth,
                                                               h: x.offsetHeight}));
  const i = [...document.querySelectorAll('img')].map(x => ({w: x.naturalWidth, h: x.naturalHeight,
                                                             ok: x.complete}));
  document.getElementById('probe').textContent = 'PROBE' + JSON.stringify({tables: t, images: i,
    h2: [...document.querySelectorAll('h2')].map(x => x.textContent)}) + 'END';
});
</script></body>"""


def _rec(method, seed, metric):
    return {"key": f"sentiment-minilm|{method}|{seed}", "task": "sentiment-minilm", "method": method,
            "variant": method, "seed": seed, "status": "ok", "metric_name": "accuracy", "metric": metric,
            "metric_before": 0.5, "trainable_params": {"lora": 1000, "dora": 1100, "vera": 100}[method],
            "adapter_bytes": 4096, "time_per_step_s": 0.1, "time_per_step_norm": 100.0, "wall_s": 10.0 + seed,
            "peak_rss_mb": 900.0, "intruders": 1, "forgetting_ratio": None,
            "loss_curve": [1.0, 0.7, 0.5], "budget_info": {"matched": True}, "versions": {}, "hardware": {"cpus": 2}}


def test_report_html_renders_in_headless_chromium(tmp_path):
    recs = [_rec(m, s, v + s / 100) for s in range(3) for m, v in (("lora", 0.8), ("dora", 0.85), ("vera", 0.7))]
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    _, page = write_report(tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE, 1))
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"PROBE(.*?)END", out.stdout)
    assert m, f"no probe output (exit {out.returncode}): {out.stderr[-500:]}"
    seen = json.loads(m.group(1))
    assert len(seen["tables"]) == 2  # the overview and the task's table
    assert all(t["rows"] >= 4 and t["w"] > 300 and t["h"] > 50 for t in seen["tables"])  # header + 3 methods
    assert len(seen["images"]) == 4  # metric vs params, vs time, memory, loss curves
    assert all(i["ok"] and i["w"] > 200 and i["h"] > 100 for i in seen["images"])  # decoded PNGs
    assert "What to use" in seen["h2"]
