"""1,000 workflows submitted at once (a tenth of them twice, as retrying clients do): every
one is stored, runs once and succeeds; a retried submit gets the first run back."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from chaos_records import Records, check, recorded_workflow
from helpers import success_events, wait_for

from tether.sdk.states import TERMINAL_RUN_STATES

pytestmark = pytest.mark.timeout(180)

SUBMITS = 1000
RETRIED = 100
CLIENT_THREADS = 32


def test_a_thousand_concurrent_submits(process_mesh, etcd, prefix, tmp_path, chaos_report):
    mesh = process_mesh()
    mesh.add_agent("n1")
    mesh.add_agent("n2")
    records = tmp_path / "records.jsonl"
    wf = recorded_workflow("many", records, 1, 1, 0.0, cpu=0.25, shell=True)
    requests = [f"req-{i}" for i in range(SUBMITS)]
    # Each retried request id comes again later in the same burst.
    burst = requests + requests[:RETRIED]

    def submit(request_id: str) -> tuple[str, str]:
        return request_id, mesh.client.submit(wf, request_id=request_id).id

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        answers = list(pool.map(submit, burst))
    submitted = time.monotonic() - t0
    first: dict[str, str] = {}
    for request_id, run_id in answers:
        assert first.setdefault(request_id, run_id) == run_id, f"{request_id} got two runs"
    assert len(set(first.values())) == SUBMITS

    wait_for(
        lambda: sum(a.ended for a in Records.read(records).attempts.values()) >= SUBMITS,
        120,
        "every run's task finished",
    )
    done = time.monotonic() - t0

    def final(run_id: str):
        run = mesh.client.get_run(run_id)
        while run.state not in TERMINAL_RUN_STATES:
            time.sleep(0.1)
            run = mesh.client.get_run(run_id)
        return run

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        runs = list(pool.map(final, first.values()))
    counts = asyncio.run(success_events(etcd.endpoint, prefix, by_run=True))
    numbers = check(runs, records, counts)
    numbers.update(
        submits=len(burst),
        retried_submits=RETRIED,
        client_threads=CLIENT_THREADS,
        submit_wall_s=round(submitted, 3),
        submits_per_s=round(len(burst) / submitted, 1),
        all_finished_s=round(done, 3),
    )
    chaos_report["concurrent_submits"] = numbers
