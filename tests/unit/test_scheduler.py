"""Placement without a server: the first-fit policy, resources across one pass, reasons."""

from __future__ import annotations

import pytest

from tether.api.v1 import types_pb2 as t
from tether.controller.cache import NodeState
from tether.controller.config import ControllerConfig
from tether.controller.scheduler import (
    DEFAULT_POLICY,
    POLICIES,
    FirstFit,
    NodeView,
    get_policy,
    plan,
)

GiB = 1 << 30


def node(name: str, cpu: float = 4, mem: int = 8 * GiB, gpus=(), max_tasks=0, **kw) -> NodeView:
    return NodeView(
        name=name,
        cpu_total=cpu,
        memory_total=mem,
        gpu_indices=tuple(gpus),
        max_tasks=max_tasks,
        **kw,
    )


def req(cpu: float = 1, mem: int = GiB, gpu: int = 0) -> t.Resources:
    return t.Resources(cpu=cpu, memory_bytes=mem, gpu=gpu)


def placed(p) -> dict:
    return {b.key: b.node for b in p.bindings}


def test_first_fit_is_the_default_and_registered():
    assert DEFAULT_POLICY == "first-fit"
    assert isinstance(get_policy("first-fit"), FirstFit)
    assert ControllerConfig().policy == "first-fit"
    assert "first-fit" in POLICIES


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        ControllerConfig(policy="no-such-policy")
    with pytest.raises(ValueError, match="no-such-policy"):
        get_policy("no-such-policy")


def test_first_fit_takes_nodes_in_name_order():
    nodes = [node("c"), node("a"), node("b")]
    p = plan([("t1", req())], nodes, FirstFit())
    assert placed(p) == {"t1": "a"}
    assert p.reasons == {}


def test_first_fit_skips_nodes_too_small():
    nodes = [node("a", cpu=1), node("b", cpu=8)]
    p = plan([("big", req(cpu=4)), ("small", req(cpu=1))], nodes, FirstFit())
    assert placed(p) == {"big": "b", "small": "a"}


def test_resources_are_accounted_across_one_pass():
    nodes = [node("a", cpu=2, mem=2 * GiB), node("b", cpu=2, mem=2 * GiB)]
    ready = [(f"t{i}", req(cpu=1, mem=GiB)) for i in range(5)]
    p = plan(ready, nodes, FirstFit())
    assert placed(p) == {"t0": "a", "t1": "a", "t2": "b", "t3": "b"}
    # t4 waits for capacity: some node could hold it once something finishes.
    assert "t4" not in p.reasons


def test_memory_is_accounted_like_cpu():
    nodes = [node("a", cpu=16, mem=3 * GiB)]
    p = plan([("x", req(mem=2 * GiB)), ("y", req(mem=2 * GiB))], nodes, FirstFit())
    assert placed(p) == {"x": "a"}


def test_what_is_already_held_counts():
    nodes = [node("a", cpu=4, cpu_used=3.5), node("b", cpu=4)]
    p = plan([("t", req(cpu=1))], nodes, FirstFit())
    assert placed(p) == {"t": "b"}


def test_gpus_are_given_by_index_and_not_twice():
    nodes = [node("a", gpus=(3, 1, 0), gpus_used=frozenset({1}))]
    p = plan([("x", req(gpu=1)), ("y", req(gpu=1)), ("z", req(gpu=1))], nodes, FirstFit())
    by_key = {b.key: b for b in p.bindings}
    assert set(by_key) == {"x", "y"}
    assert by_key["x"].gpu_indices == (3,)
    assert by_key["y"].gpu_indices == (0,)
    assert "z" not in p.reasons  # the node has three GPUs: z waits for one


def test_a_node_view_follows_the_node_state():
    st = NodeState("n", capacity=req(cpu=4, mem=4 * GiB, gpu=2), gpu_indices=[1, 0], max_tasks=3)
    st.cpu_used, st.memory_used, st.gpus_used = 1.0, GiB, {0}
    st.attempts = {("r", "t")}
    v = st.view()
    assert (v.cpu_free, v.memory_free, v.free_gpus) == (3.0, 3 * GiB, (1,))
    assert v.running == 1 and v.has_slot


def test_task_slots_limit_a_node():
    nodes = [node("a", max_tasks=1), node("b", max_tasks=2, running=1)]
    p = plan([("x", req()), ("y", req()), ("z", req())], nodes, FirstFit())
    assert placed(p) == {"x": "a", "y": "b"}
    assert p.reasons == {}  # no slot left anywhere: the pass ends, nothing to explain


def test_a_task_no_node_can_ever_hold_gets_a_reason():
    nodes = [node("a", cpu=2), node("b", cpu=4)]
    p = plan([("huge", req(cpu=64, mem=GiB)), ("ok", req())], nodes, FirstFit())
    assert placed(p) == {"ok": "a"}
    assert p.reasons == {"huge": "no node can ever hold cpu=64 memory=1Gi gpu=0"}


def test_every_task_of_an_impossible_shape_gets_the_reason():
    nodes = [node("a")]
    p = plan([("g1", req(gpu=1)), ("g2", req(gpu=1))], nodes, FirstFit())
    assert p.bindings == []
    assert p.reasons["g1"] == p.reasons["g2"]
    assert "gpu=1" in p.reasons["g1"]


def test_waiting_for_capacity_is_not_a_reason():
    nodes = [node("a", cpu=2, cpu_used=2)]
    p = plan([("t", req(cpu=1))], nodes, FirstFit())
    assert p.bindings == [] and p.reasons == {}


def test_no_connected_nodes_means_waiting():
    # As the engine always did: with no node there is no slot, so the pass ends at once.
    p = plan([("t", req())], [], FirstFit())
    assert p.bindings == [] and p.reasons == {}


def test_a_policy_scores_among_nodes_that_pass_its_filter():
    class MostFreeCpu:
        name = "test-most-free-cpu"

        def filter(self, request, n):
            return n.fits(request)

        def score(self, request, n):
            return n.cpu_free

    nodes = [node("a", cpu=2), node("b", cpu=8), node("c", cpu=8)]
    p = plan([("x", req(cpu=1)), ("y", req(cpu=1))], nodes, MostFreeCpu())
    # Ties go to the earlier name; "b" is charged for x before y is placed.
    assert placed(p) == {"x": "b", "y": "c"}


def test_a_binding_says_why_the_other_nodes_were_turned_down():
    nodes = [
        node("a", cpu=0.5),
        node("b", mem=GiB // 2),
        node("c", gpus=()),
        node("d", max_tasks=1, running=1),
        node("e", gpus=(0,)),
    ]
    p = plan([("t", req(cpu=1, mem=GiB, gpu=1))], nodes, FirstFit())
    (b,) = p.bindings
    assert b.node == "e"
    assert dict(b.rejected) == {
        "a": "cpu: 0.5 free < 1",
        "b": f"memory: {GiB // 2} bytes free < {GiB}",
        "c": "gpu: 0 free < 1",
        "d": "at its task limit (1)",
    }
    assert node("e", gpus=(0,)).why_not(req(gpu=1)) == ""
