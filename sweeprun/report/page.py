"""The sweep page as one self-contained HTML file: plotly's bundled JavaScript, the page's own
script and the data inlined, so it opens from a bucket, Drive or a notebook's file browser with
no network and no server (the ``ui`` extra: ``pip install 'sweeprun[ui]'``).

Why plotly: it ships its whole JavaScript bundle inside the Python package (no CDN, no
build step), and draws the four charts the page needs (parallel coordinates, lines in WebGL
for thousands of curves, horizontal bars on a date axis) with hover and zoom for free.
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from typing import Any

from ..errors import SweeprunError

#: The live page asks for new data this often.
REFRESH_MS = 3000

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 20px 0 6px; }
.meta { color: #666; } .chip { display: inline-block; padding: 2px 8px; margin: 4px 6px 0 0;
  border-radius: 10px; background: #eee; } #error { color: #b00; } #notes, .note { color: #666; }
.controls label { margin-right: 14px; } .tablebox { max-height: 420px; overflow: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; } th, td { padding: 3px 8px; text-align: left;
  border-bottom: 1px solid #eee; white-space: nowrap; } th { position: sticky; top: 0; background: #fafafa; }
.state-done { color: #2a7d2a; } .state-failed, .state-diverged { color: #b00; }
.state-running { color: #1f5fa8; } .state-interrupted { color: #b36b00; }
"""


def plotly_js() -> str:
    """Plotly's bundled JavaScript, from the installed package (no network)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise SweeprunError("report and ui need plotly: pip install 'sweeprun[ui]'") from None
    return get_plotlyjs()


def _script_safe(text: str) -> str:
    """JavaScript ``text`` as it may stand inside a ``<script>`` element: ``</script`` and
    ``<!--`` (which would end or change it) only ever occur in its strings and regular
    expressions, where ``<\\/`` and ``<\\!`` read the same."""
    return re.sub(r"<(/script|!--)", lambda m: "<\\" + m.group(1), text, flags=re.IGNORECASE)


def render(data: dict[str, Any], *, live: bool = False, refresh_ms: int = REFRESH_MS,
           plotly: str | None = None) -> str:
    """The page for ``data`` (:func:`sweeprun.report.data.collect`). ``live``: the page asks its
    server for ``data.json`` every ``refresh_ms`` and draws it again (``sweeprun ui``)."""
    blob = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    script = resources.files(__package__).joinpath("page.js").read_text(encoding="utf-8")
    title = html.escape(f"sweep {data['sweep']}")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        # Nothing may leave the machine: no fetch but this page's own server, no other source.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; "
        "font-src data:; connect-src 'self'; worker-src blob:\">",
        f"<title>{title}</title><style>{_STYLE}</style></head>\n",
        f"<body data-live=\"{1 if live else 0}\" data-refresh-ms=\"{int(refresh_ms)}\">",
        f"<h1>{title}</h1><div class=\"meta\">{html.escape(data['store'])} · <span id=\"generated\"></span></div>",
        "<div id=\"summary\"></div><div id=\"error\"></div>",
        "<div class=\"controls\"><h2>Runs</h2>",
        "<label>metric <select id=\"metric\"></select></label>",
        "<label>best is <select id=\"goal\"><option value=\"min\">lowest</option>"
        "<option value=\"max\">highest</option></select></label>",
        "<label>top <input id=\"topk\" type=\"number\" min=\"0\" step=\"1\" style=\"width:5em\"> "
        "(0: all)</label>",
        "<label><input id=\"logmetric\" type=\"checkbox\"> log metric axis</label></div>",
        "<div class=\"tablebox\"><table id=\"runs\"></table></div><div id=\"notes\"></div>",
        "<h2>Parameters against the metric</h2><div id=\"parallel\"></div>",
        "<h2>Curves</h2><div class=\"controls\"><label>group by <select id=\"by\"></select></label></div>",
        "<div id=\"curves\"></div>",
        "<h2>Attempts</h2><div class=\"note\" id=\"timeline-note\"></div><div id=\"timeline\"></div>",
        f"<script id=\"sweep-data\" type=\"application/json\">{blob}</script>\n",
        f"<script>{_script_safe(plotly if plotly is not None else plotly_js())}</script>\n",
        f"<script>{_script_safe(script)}</script>\n",
        "</body></html>\n",
    ])
