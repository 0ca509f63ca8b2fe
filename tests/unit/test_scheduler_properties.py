"""Properties of the placement core over random meshes and queues (hypothesis)."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.controller.preemption import value
from tether.controller.scheduler import (
    POLICIES,
    NodeView,
    Running,
    TaskRequest,
    effective_priority,
    get_policy,
    plan,
)
from tether.controller.selectors import Constraints, Expr, label_of

ZONES = ["z1", "z2", "z3"]


@st.composite
def nodes(draw):
    out = []
    for i in range(draw(st.integers(1, 8))):
        gpus = draw(st.integers(0, 3))
        used = draw(st.sets(st.integers(0, max(gpus - 1, 0)), max_size=gpus)) if gpus else set()
        cpu = draw(st.sampled_from([1.0, 2.0, 4.0, 8.0]))
        labels = {}
        if draw(st.booleans()):
            labels["zone"] = draw(st.sampled_from(ZONES))
        if gpus:
            labels["tether.io/gpu-model"] = draw(st.sampled_from(["a100", "h100"]))
        out.append(
            NodeView(
                name=f"n{i}",
                cpu_total=cpu,
                cpu_used=draw(st.sampled_from([0.0, cpu / 2])),
                memory_total=8,
                memory_used=draw(st.integers(0, 4)),
                gpu_indices=tuple(range(gpus)),
                gpus_used=frozenset(used),
                max_tasks=draw(st.integers(0, 4)),
                labels=tuple(sorted(labels.items())),
            )
        )
    return out


exprs = st.builds(
    Expr,
    key=st.just("zone"),
    op=st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
    values=st.lists(st.sampled_from(ZONES), min_size=1, max_size=2).map(tuple),
)
constraints = st.builds(
    Constraints,
    selector=st.sampled_from([(), (("gpu-model", "a100"),), (("zone", "z1"),)]),
    required=st.lists(exprs, max_size=2).map(tuple),
)


@st.composite
def tasks(draw):
    out = []
    for i in range(draw(st.integers(1, 25))):
        out.append(
            TaskRequest(
                key=f"t{i}",
                cpu=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])),
                memory=draw(st.integers(0, 5)),
                gpu=draw(st.integers(0, 2)),
                priority=draw(st.integers(0, 100)),
                seq=i,
                rank=draw(st.floats(0, 100)),
                constraints=draw(constraints),
                replicas=draw(st.sampled_from([1, 1, 1, 2, 3])),
            )
        )
    return out


policies = st.sampled_from(sorted(POLICIES)).map(get_policy)


def labels_of(n: NodeView) -> dict:
    return dict(n.labels)


@settings(max_examples=300, deadline=None)
@given(nodes(), tasks(), policies)
def test_capacity_gpus_selectors_and_gangs_hold(ns, ts, policy):
    p = plan(ts, ns, policy)
    by_name = {n.name: n for n in ns}
    by_key = {r.key: r for r in ts}
    cpu = defaultdict(float)
    mem = defaultdict(int)
    count = defaultdict(int)
    gpus: dict[str, set] = defaultdict(set)
    replicas = defaultdict(list)
    for b in p.bindings:
        r, n = by_key[b.key], by_name[b.node]
        cpu[b.node] += r.cpu
        mem[b.node] += r.memory
        count[b.node] += 1
        # GPUs: the right count, on the node, free before, never given twice.
        assert len(b.gpu_indices) == r.gpu
        assert set(b.gpu_indices) <= set(n.gpu_indices) - n.gpus_used
        assert not gpus[b.node] & set(b.gpu_indices)
        gpus[b.node] |= set(b.gpu_indices)
        # Selectors and required affinity honoured.
        assert r.constraints.allows(labels_of(n))
        replicas[b.key].append((b.replica, b.node))
    for name, n in by_name.items():
        assert n.cpu_used + cpu[name] <= n.cpu_total + 1e-6
        assert n.memory_used + mem[name] <= n.memory_total
        if n.max_tasks:
            assert n.running + count[name] <= n.max_tasks
    for key, reps in replicas.items():
        r = by_key[key]
        # All or nothing, on distinct nodes, indices 0..N-1.
        assert sorted(i for i, _ in reps) == list(range(r.replicas))
        assert len({node for _, node in reps}) == r.replicas
    for key in p.reasons:
        assert key not in replicas


@settings(max_examples=200, deadline=None)
@given(tasks(), policies, st.floats(0, 1000), st.sampled_from([0.0, 1.0, 10.0]))
def test_placement_follows_priority_then_policy_order(ts, policy, now, aging):
    # One big node with exactly k slots: the k placed tasks are the first k in order.
    singles = [
        TaskRequest(
            r.key, cpu=0.0, priority=r.priority, seq=r.seq, rank=r.rank, ready_at=float(r.seq)
        )
        for r in ts
    ]
    k = max(1, len(singles) // 2)
    n = NodeView("big", cpu_total=100, memory_total=100, max_tasks=k)
    p = plan(singles, [n], policy, now=now, aging=aging)
    got = [b.key for b in p.bindings]

    def order(r):
        return (-effective_priority(r, now, aging), -r.rank if policy.ranks else 0.0, r.seq)

    assert got == [r.key for r in sorted(singles, key=order)[:k]]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 99), st.floats(0.1, 100))
def test_aging_never_starves(priority, aging):
    low = TaskRequest("low", priority=priority, ready_at=0.0)
    later = 100 * aging
    assert effective_priority(low, later, aging) == 100  # reaches the top in bounded time


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 100), st.booleans(), st.sampled_from([1.0, 2.0]), st.floats(0, 50)
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 100),
    st.sampled_from([1.0, 2.0, 3.0]),
)
def test_preemption_takes_least_valuable_lower_priority_victims(att, priority, cpu):
    running = tuple(
        Running(f"v{i}", cpu=c, priority=pr, preemptible=pe, started=s)
        for i, (pr, pe, c, s) in enumerate(att)
    )
    used = sum(r.cpu for r in running)
    n = NodeView(
        "a", cpu_total=used, cpu_used=used, memory_total=1, running=len(running), attempts=running
    )
    p = plan([TaskRequest("u", cpu=cpu, priority=priority)], [n], get_policy("fifo"))
    assert p.bindings == []
    allowed = [r for r in running if r.preemptible and r.priority < priority]
    if sum(r.cpu for r in allowed) + 1e-9 < cpu:
        assert p.preemptions == []
        return
    (pre,) = p.preemptions
    chosen = pre.victims.victims
    assert all(v in allowed for v in chosen)
    assert sum(v.cpu for v in chosen) + 1e-9 >= cpu  # enough room is made
    # Minimal: no victim could be spared.
    for v in chosen:
        assert sum(x.cpu for x in chosen if x is not v) + 1e-9 < cpu
    # Least valuable first: no unchosen allowed attempt of lower value could replace a
    # chosen one of the same size.
    for v in chosen:
        for other in allowed:
            if other not in chosen and other.cpu == v.cpu:
                assert value(other) >= value(v)


@given(
    st.dictionaries(
        st.sampled_from(["zone", "tether.io/gpu-model", "x"]), st.sampled_from(["a", "b"])
    ),
    exprs,
)
def test_expressions_are_consistent(labels, e):
    v = label_of(labels, e.key)
    if e.op == "In":
        assert e.matches(labels) == (v in e.values)
    elif e.op == "NotIn":
        assert e.matches(labels) == (v not in e.values)
    elif e.op == "Exists":
        assert e.matches(labels) == (v is not None)
    else:
        assert e.matches(labels) == (v is None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([2.0, 4.0, 8.0]), st.integers(0, 6), st.integers(0, 5)),
        min_size=1,
        max_size=10,
    ),
    st.sampled_from([0.5, 1.0, 2.0]),
    policies,
)
def test_each_policy_takes_its_best_fitting_node(shapes, cpu, policy):
    ns = [
        NodeView(f"n{i}", cpu_total=c, cpu_used=min(c, u / 2), memory_total=8, running=r)
        for i, (c, u, r) in enumerate(shapes)
    ]
    p = plan([TaskRequest("t", cpu=cpu)], ns, policy)
    fitting = [n for n in ns if n.fits(TaskRequest("t", cpu=cpu))]
    if not fitting:
        assert p.bindings == []
        return
    best = min(fitting, key=lambda n: (policy.node_key(n), n.name))
    assert [b.node for b in p.bindings] == [best.name]
