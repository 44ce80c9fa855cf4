"""``sweeprun ui``: the report's page served live on loopback, read-only, redrawn as runs go on."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.error
import urllib.request

import pytest

from _browser import browser, console_errors, origins, requested_urls, table
from conftest import Sandbox, wait_for


@pytest.mark.slow  # a browser kept open while a run trains: the full suite's
def test_the_live_page_shows_a_runs_new_steps_without_a_reload(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"lr": [0.1, 0.2]}, {"api": True, "steps": 400, "sleep": 0.2})
    launch = sandbox.sweeprun("launch", str(sweep), "--workers", "2")
    ui = sandbox.sweeprun("ui", str(sweep), "--port", "0", "--ledger", str(sandbox.ledger))
    try:
        line = ui.stdout.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+/) ", line)
        assert found, line
        url = found.group(1)
        wait_for(lambda: any(e["event"] == "first_step" for e in sandbox.events()), what="a first step")
        with browser() as driver:
            requested_urls(driver)
            driver.get(url)
            wait_for(lambda: any(c["step"] for c in table(driver).values()), what="a step on the page")
            run, first = next((r, int(c["step"])) for r, c in table(driver).items() if c["step"])
            assert table(driver)[run]["state"] == "running"
            wait_for(lambda: int(table(driver)[run]["step"] or 0) >= first + 5, timeout=120,
                     what="the page to show newer steps by itself")
            assert console_errors(driver) == []
            # nothing but the page's own server (and what the browser makes itself)
            assert origins(requested_urls(driver)) <= {url.rstrip("/"), "data", "blob"}

        data = json.loads(urllib.request.urlopen(url + "data.json").read())
        assert {r["state"] for r in data["runs"]} == {"running"}
        for method, path, code in (("POST", "data.json", 405), ("DELETE", "", 405), ("GET", "etc/passwd", 404)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url + path, method=method))
            assert refused.value.code == code
        # another site's page, through a name that resolves to 127.0.0.1 (DNS rebinding)
        rebound = urllib.request.Request(url + "data.json", headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound)
        assert refused.value.code == 403
    finally:
        os.killpg(launch.pid, signal.SIGTERM)
        launch.communicate(timeout=120)
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=30) == 130
        ui.communicate()


def test_a_taken_port_is_one_line(sandbox: Sandbox) -> None:
    import socket

    sweep = sandbox.write_sweep({"lr": [0.1]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = sandbox.run("ui", str(sweep), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot serve on 127.0.0.1" in result.stderr and "Traceback" not in result.stderr
