"""Placement without a server: each policy's order, resources across one pass, GPU nodes kept
for GPU tasks, selectors and affinity, priorities and aging, preemption, gangs, reasons."""

from __future__ import annotations

import pytest

from tether.api.v1 import types_pb2 as t
from tether.controller.cache import NodeState
from tether.controller.config import ControllerConfig
from tether.controller.scheduler import (
    DEFAULT_POLICY,
    POLICIES,
    NodeView,
    Running,
    TaskRequest,
    get_policy,
    plan,
)
from tether.controller.selectors import Constraints, Expr

GiB = 1 << 30
FIFO = get_policy("fifo")


def node(name: str, cpu: float = 4, mem: int = 8 * GiB, gpus=(), max_tasks=0, **kw) -> NodeView:
    labels = kw.pop("labels", {})
    return NodeView(
        name=name,
        cpu_total=cpu,
        memory_total=mem,
        gpu_indices=tuple(gpus),
        max_tasks=max_tasks,
        labels=tuple(sorted(labels.items())),
        **kw,
    )


def req(key="t", cpu: float = 1, mem: int = GiB, gpu: int = 0, **kw) -> TaskRequest:
    return TaskRequest(key, cpu=cpu, memory=mem, gpu=gpu, **kw)


def placed(p) -> dict:
    return {b.key: b.node for b in p.bindings}


def test_policies_are_registered_and_the_default_is_critical_path():
    names = {"binpack", "spread", "fifo", "least-connections", "critical-path"}
    assert set(POLICIES) == names | {"first-fit"}
    assert POLICIES["first-fit"] is POLICIES["fifo"]  # the earlier releases' name
    assert DEFAULT_POLICY == "critical-path"
    assert ControllerConfig().policy == "critical-path"


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        ControllerConfig(policy="no-such-policy")
    with pytest.raises(ValueError, match="no-such-policy"):
        get_policy("no-such-policy")


def test_fifo_takes_nodes_in_name_order():
    p = plan([req("t1")], [node("c"), node("a"), node("b")], FIFO)
    assert placed(p) == {"t1": "a"}
    assert p.reasons == {}


def test_fifo_places_in_submission_order():
    nodes = [node("a", cpu=1)]
    p = plan([req("late", seq=2), req("early", seq=1)], nodes, FIFO)
    assert placed(p) == {"early": "a"}


def test_binpack_fills_the_fullest_node_first():
    nodes = [node("a", cpu=4), node("b", cpu=4, cpu_used=2, memory_used=4 * GiB)]
    p = plan([req(f"t{i}", cpu=1, seq=i) for i in range(3)], nodes, get_policy("binpack"))
    assert placed(p) == {"t0": "b", "t1": "b", "t2": "a"}


def test_spread_takes_the_emptiest_node_first():
    nodes = [node("a"), node("b"), node("c")]
    p = plan([req(f"t{i}", seq=i) for i in range(3)], nodes, get_policy("spread"))
    assert sorted(placed(p).values()) == ["a", "b", "c"]


def test_least_connections_counts_attempts_not_resources():
    nodes = [node("a", running=3), node("b", cpu=4, cpu_used=3.5, running=1)]
    p = plan([req("x", cpu=0.5)], nodes, get_policy("least-connections"))
    assert placed(p) == {"x": "b"}


def test_critical_path_orders_by_rank_within_a_priority():
    nodes = [node("a", cpu=1)]
    ready = [req("short", seq=0, rank=1.0), req("long", seq=1, rank=10.0)]
    assert placed(plan(ready, nodes, get_policy("critical-path"))) == {"long": "a"}
    assert placed(plan(ready, nodes, FIFO)) == {"short": "a"}


def test_a_workflow_policy_overrides_the_controllers():
    nodes = [node("a", cpu=1)]
    cp = get_policy("critical-path")
    ready = [req("short", seq=0, rank=1.0, policy=cp), req("long", seq=1, rank=9.0, policy=cp)]
    assert placed(plan(ready, nodes, FIFO)) == {"long": "a"}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_gpu_nodes_are_kept_for_gpu_tasks(policy):
    # Six 0.5-CPU tasks: the plain nodes take all of them, the GPU node stays free.
    nodes = [node("gpu-node", cpu=8, gpus=(0,)), node("node-a", cpu=2), node("node-b", cpu=2)]
    ready = [req(f"t{i}", cpu=0.5, mem=0, seq=i) for i in range(6)]
    p = plan(ready, nodes, get_policy(policy))
    assert len(p.bindings) == 6 and "gpu-node" not in placed(p).values()


def test_a_gpu_node_is_used_when_nothing_else_fits():
    nodes = [node("gpu-node", cpu=8, gpus=(0,)), node("small", cpu=1)]
    p = plan([req("a", cpu=1, seq=0), req("b", cpu=1, seq=1)], nodes, FIFO)
    assert placed(p) == {"a": "small", "b": "gpu-node"}


def test_resources_are_accounted_across_one_pass():
    nodes = [node("a", cpu=2, mem=2 * GiB), node("b", cpu=2, mem=2 * GiB)]
    p = plan([req(f"t{i}", cpu=1, mem=GiB, seq=i) for i in range(5)], nodes, FIFO)
    assert placed(p) == {"t0": "a", "t1": "a", "t2": "b", "t3": "b"}
    assert "t4" not in p.reasons  # waits for capacity


def test_gpus_are_given_by_index_and_not_twice():
    nodes = [node("a", gpus=(3, 1, 0), gpus_used=frozenset({1}))]
    p = plan([req(k, gpu=1, seq=i) for i, k in enumerate("xyz")], nodes, FIFO)
    by_key = {b.key: b for b in p.bindings}
    assert set(by_key) == {"x", "y"}
    assert by_key["x"].gpu_indices == (3,) and by_key["y"].gpu_indices == (0,)
    assert "z" not in p.reasons


def test_a_node_view_follows_the_node_state():
    st = NodeState("n", capacity=t.Resources(cpu=4, memory_bytes=4 * GiB, gpu=2))
    st.gpu_indices, st.max_tasks = [1, 0], 3
    st.cpu_used, st.memory_used, st.gpus_used = 1.0, GiB, {0}
    st.attempts = {("r", "t")}
    v = st.view()
    assert (v.cpu_free, v.memory_free, v.free_gpus) == (3.0, 3 * GiB, (1,))
    assert v.running == 1 and v.has_slot


def test_task_slots_limit_a_node():
    nodes = [node("a", max_tasks=1), node("b", max_tasks=2, running=1)]
    p = plan([req(k, seq=i) for i, k in enumerate("xyz")], nodes, FIFO)
    assert placed(p) == {"x": "a", "y": "b"}
    assert p.reasons == {}


def test_node_selector_picks_the_labelled_node_and_reasons_name_it():
    nodes = [
        node("plain", gpus=(0, 1)),
        node("fast", gpus=(0,), labels={"tether.io/gpu-model": "a100"}),
    ]
    sel = Constraints(selector=(("gpu-model", "a100"),))
    p = plan([req("one", gpu=1, constraints=sel)], nodes, FIFO)
    assert placed(p) == {"one": "fast"}
    p = plan([req("two", gpu=2, constraints=sel)], nodes, FIFO)
    assert p.bindings == []
    assert p.reasons == {"two": "needs 2 GPUs with gpu-model=a100; the best node has 1"}
    none = Constraints(selector=(("gpu-model", "h100"),))
    p = plan([req("h", gpu=1, constraints=none)], nodes, FIFO)
    assert p.reasons["h"].startswith("no node matches gpu-model=h100")


@pytest.mark.parametrize(
    "expr, expected",
    [
        (Expr("zone", "In", ("z1", "z2")), {"a", "b"}),
        (Expr("zone", "NotIn", ("z1",)), {"b", "c"}),
        (Expr("zone", "Exists"), {"a", "b"}),
        (Expr("zone", "DoesNotExist"), {"c"}),
    ],
)
def test_required_affinity_filters(expr, expected):
    nodes = [node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2"}), node("c")]
    c = Constraints(required=(expr,))
    ready = [req(f"t{i}", cpu=4, mem=0, seq=i, constraints=c) for i in range(3)]
    assert set(placed(plan(ready, nodes, FIFO)).values()) == expected


def test_preferred_affinity_scores_by_weight():
    nodes = [node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2", "ssd": "y"})]
    c = Constraints(
        preferred=(Expr("zone", "In", ("z1",), weight=10), Expr("ssd", "Exists", weight=20))
    )
    assert placed(plan([req("x", constraints=c)], nodes, FIFO)) == {"x": "b"}
    # Preferred is a score, not a filter: when b is full, a takes it.
    full_b = [nodes[0], node("b", cpu_used=4, labels={"zone": "z2", "ssd": "y"})]
    assert placed(plan([req("x", constraints=c)], full_b, FIFO)) == {"x": "a"}


def test_higher_priority_first_fifo_within_a_priority():
    nodes = [node("a", cpu=2)]
    ready = [
        req("lo", seq=0, priority=10),
        req("hi2", seq=2, priority=90),
        req("hi1", seq=1, priority=90),
    ]
    assert placed(plan(ready, nodes, FIFO)) == {"hi1": "a", "hi2": "a"}


def test_aging_lifts_a_long_waiting_task():
    nodes = [node("a", cpu=1)]
    ready = [
        req("old-low", seq=0, priority=10, ready_at=0.0),
        req("new-high", seq=1, priority=50, ready_at=99.0),
    ]
    assert placed(plan(ready, nodes, FIFO, now=100.0, aging=0)) == {"new-high": "a"}
    # 10 + 100 s / 2 s per point = 60 > 50
    assert placed(plan(ready, nodes, FIFO, now=100.0, aging=2.0)) == {"old-low": "a"}


def test_preemption_picks_the_least_valuable_victims():
    victims = (
        Running("p30", cpu=2, priority=30, preemptible=True, started=1),
        Running("p10-old", cpu=2, priority=10, preemptible=True, started=1),
        Running("p10-new", cpu=2, priority=10, preemptible=True, started=5),
        Running("keep", cpu=2, priority=10, preemptible=False, started=9),
    )
    nodes = [node("a", cpu=8, cpu_used=8, running=4, attempts=victims)]
    p = plan([req("urgent", cpu=2, priority=90)], nodes, FIFO)
    assert p.bindings == []
    (pre,) = p.preemptions
    assert pre.key == "urgent" and [v.key for v in pre.victims.victims] == ["p10-new"]


def test_no_preemption_of_equal_priority_or_non_preemptible():
    att = (
        Running("same", cpu=4, priority=90, preemptible=True),
        Running("fixed", cpu=4, priority=0, preemptible=False),
    )
    nodes = [node("a", cpu=8, cpu_used=8, running=2, attempts=att)]
    assert plan([req("u", cpu=2, priority=90)], nodes, FIFO).preemptions == []


def test_a_gang_is_placed_whole_on_distinct_nodes_or_not_at_all():
    nodes = [node("a", max_tasks=1), node("b", max_tasks=1), node("c", max_tasks=1, running=1)]
    p = plan([req("g", replicas=2)], nodes, FIFO)
    assert sorted((b.replica, b.node) for b in p.bindings) == [(0, "a"), (1, "b")]
    p = plan([req("g3", replicas=3, seq=0), req("solo", seq=1)], nodes, FIFO)
    assert placed(p) == {"solo": "a"}  # nothing was held back for the gang
    assert "g3" not in p.reasons  # c could hold a replica once its task ends


def test_a_gang_that_can_never_fit_says_why():
    nodes = [node("a"), node("b", cpu=1)]
    p = plan([req("g", cpu=2, replicas=2)], nodes, FIFO)
    assert p.bindings == []
    assert "gang of 2 replicas" in p.reasons["g"] and "only 1 can" in p.reasons["g"]


def test_a_task_no_node_can_ever_hold_gets_a_reason():
    nodes = [node("a", cpu=2), node("b", cpu=4)]
    p = plan([req("huge", cpu=64, seq=0), req("ok", seq=1)], nodes, FIFO)
    assert placed(p) == {"ok": "a"}
    assert p.reasons == {"huge": "needs cpu=64; the best node has 4"}


def test_waiting_for_capacity_is_not_a_reason():
    p = plan([req("t")], [node("a", cpu=2, cpu_used=2)], FIFO)
    assert p.bindings == [] and p.reasons == {}


def test_no_connected_nodes_means_waiting():
    p = plan([req("t")], [], FIFO)
    assert p.bindings == [] and p.reasons == {}


def test_a_node_says_what_keeps_a_task_off_it():
    assert node("a", cpu=0.5).why_not(req(cpu=1)) == "cpu: 0.5 free < 1"
    assert node("b", mem=GiB // 2).why_not(req(mem=GiB)) == f"memory: {GiB // 2} bytes free < {GiB}"
    assert node("c", gpus=()).why_not(req(gpu=1)) == "gpu: 0 free < 1"
    assert node("d", max_tasks=1, running=1).why_not(req()) == "at its task limit (1)"
    assert node("e", gpus=(0,)).why_not(req(gpu=1)) == ""
