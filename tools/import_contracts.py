"""An import-linter contract type: no import cycle among the modules of the given packages.

``lint-imports`` (``make lint``) loads it through ``contract_types`` in pyproject.toml. import-linter's
own ``acyclic_siblings`` contract cannot say this fully: it looks for cycles among the children of one
package at a time, so a cycle between root packages (they have no common parent) or through a package's
own ``__init__`` goes unseen, while a cycle between two subpackages taken whole is reported even when
no module of theirs imports itself back. This contract works on modules: every import grimp finds
(at module level or inside a function, which runs too) is an edge, and a strongly connected component
of more than one module is a cycle, reported with the file lines that make it.

A module outside the pipeline's packages on purpose: the pipeline must not import import-linter (a dev
dependency), and code under flows/, tasks/, model/ or storage/ would also be part of a stage's key.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class AcyclicContract(Contract):
    """No module of ``containers`` (default: the root packages) imports itself back, directly or through
    other modules of ``containers``."""

    type_name = "acyclic"
    containers = fields.ListField(subfield=fields.StringField(), required=False)

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        roots = self.containers or sorted(self.session_options.get("root_packages", []))
        modules = {m for m in graph.modules if any(m == r or m.startswith(f"{r}.") for r in roots)}
        edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in sorted(modules)}
        cycles = [_shortest_cycle(component, edges) for component in _components(edges) if len(component) > 1]
        output.verbose_print(verbose, f"{len(modules)} modules, {len(cycles)} import cycle(s).")
        described = [
            [(a, b, _lines(graph, a, b)) for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
            for cycle in sorted(cycles)
        ]
        return ContractCheck(kept=not cycles, metadata={"cycles": described})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            names = [importer for importer, _, _ in cycle]
            output.print_error(f"Import cycle: {' -> '.join([*names, names[0]])}")
            output.new_line()
            for importer, imported, lines in cycle:
                output.indent_cursor()
                output.print_error(f"{importer} -> {imported} ({lines})", bold=False)
            output.new_line()


def _components(edges: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of ``edges`` (Tarjan's algorithm, iteratively: no recursion
    limit on a long import chain)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
    return found


def _shortest_cycle(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within the component)."""
    inside, start = set(component), component[0]
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in edges[node]:
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            if nxt in inside and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start} in its component")  # a component of 2+ has one


def _lines(graph: ImportGraph, importer: str, imported: str) -> str:
    details: list[dict[str, Any]] = graph.get_import_details(importer=importer, imported=imported)
    return "; ".join(f"l.{d['line_number']}: {d['line_contents']}" for d in details)
