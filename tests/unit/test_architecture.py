"""The import layering of docs/architecture.md, enforced: import-linter's contracts (pyproject.toml)
and no import cycle between modules or between packages, imports inside functions included."""
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]


def _graph():
    return grimp.build_graph("stts_dist", "data_pipeline", include_external_packages=False)


def _strongly_connected(adj: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of size > 1 (iterative: the graph has ~150 nodes)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(adj):
        if root in index:
            continue
        work = [(root, iter(sorted(adj[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(adj.get(child, ())))))
                    break
                if child in on:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def package_of(module: str) -> str:
    """``stts_dist.train.trainer`` -> ``stts_dist.train``; top-level modules are their own package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "stts_dist" and len(parts) > 1 else parts[0]


def test_the_cycle_finder_finds_cycles():
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules_or_packages():
    graph = _graph()
    modules = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _strongly_connected(modules) == []
    packages: dict[str, set[str]] = defaultdict(set)
    for m, imported in modules.items():
        packages[package_of(m)] |= {package_of(i) for i in imported} - {package_of(m)}
    assert _strongly_connected(dict(packages)) == []


def test_import_linter_contracts_hold():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "7 kept, 0 broken" in done.stdout
