"""Tag Router node: routing a chain into THOUGHT / ACTION / CHECK, directly and inside a real graph."""

from __future__ import annotations

import asyncio

import pytest
from lfx.components.input_output import ChatOutput
from lfx.graph import Graph

from overlay.langflow_support import NodeError
from overlay_components.overlay.tag_router import TagRouterComponent

CHAIN = ("<Q> How many clips? <THOUGHT> Natalia sold half as many in May. <ACTION> CALL calc(48/2) <RESULT> 24 "
         "<CHECK> calc(48/2) = 24 <THOUGHT> Add both months. <ACTION> CALL calc(48+24) <RESULT> 72 <ANSWER> 72 <EOS>")


def test_each_output_carries_its_steps_with_tool_results_and_verdicts():
    component = TagRouterComponent(chain=CHAIN)
    assert component.get_thought().text == "Natalia sold half as many in May.\nAdd both months."
    assert component.get_action().text == "CALL calc(48/2) -> 24\nCALL calc(48+24) -> 72"
    assert component.get_check().text == "calc(48/2) = 24 -> pass: both sides equal: 24 vs 24"
    assert component.status.startswith("2 THOUGHT, 2 ACTION, 1 CHECK")


def test_failed_tools_and_checks_are_reported_not_raised():
    component = TagRouterComponent(chain="<ACTION> CALL calc(1/0) <CHECK> 2+2 = 5 <ACTION> CALL nope(1)")
    action = component.get_action().text.splitlines()
    assert action[0].startswith("CALL calc(1/0) -> error: calc: division by zero")
    assert "unknown tool 'nope'" in action[1]
    assert component.get_check().text == "2+2 = 5 -> fail: sides differ: 4 vs 5"


def test_tools_and_verification_can_be_switched_off():
    component = TagRouterComponent(chain=CHAIN, run_tools=False, verify_checks=False)
    assert component.get_action().text == "CALL calc(48/2)\nCALL calc(48+24)"
    assert component.get_check().text == "calc(48/2) = 24"


def test_router_output_is_the_decoders_spec():
    component = TagRouterComponent(max_step_repeats=2)
    spec = component.get_router().data
    assert spec["kind"] == "overlay.router" and spec["max_step_repeats"] == 2 and "calc" in spec["tools"]
    assert component.status.endswith("stop when a step repeats 2 times")
    with pytest.raises(NodeError, match="Max Step Repeats must be at least 1"):
        TagRouterComponent(max_step_repeats=0).get_router()


def test_empty_chain_is_a_readable_error():
    with pytest.raises(NodeError, match="the chain is empty"):
        TagRouterComponent(chain="  ").get_thought()


def test_outputs_are_shown_together():
    outputs = TagRouterComponent().to_frontend_node()["data"]["node"]["outputs"]
    assert [o["name"] for o in outputs] == ["thought", "action", "check", "router"]
    assert all(o["group_outputs"] for o in outputs)


def run_graph(chain: str) -> dict[str, str]:
    """Wire each routed output to its own Chat Output, run the graph, and return the text each output received."""
    router = TagRouterComponent(_id="router")
    router.set(chain=chain)
    outputs = {name: ChatOutput(_id=f"out-{name}") for name in ("thought", "action", "check")}
    for name, out in outputs.items():
        out.set(input_value=getattr(router, f"get_{name}"))
    graph = Graph(start=router, end=outputs["thought"])
    for name in ("action", "check"):
        graph.add_component(outputs[name])
        graph.add_component_edge(router._id, (name, "input_value"), outputs[name]._id)

    async def collect() -> dict[str, str]:
        received = {}
        async for result in graph.async_start():
            if hasattr(result, "vertex") and result.vertex.id.startswith("out-"):
                received[result.vertex.id.removeprefix("out-")] = result.result_dict.results["message"].text
        return received

    return asyncio.run(collect())


def test_all_branches_run_when_each_tag_is_present():
    assert run_graph("<THOUGHT> a <ACTION> CALL calc(1+1) <CHECK> 2 = 2") == {
        "thought": "a", "action": "CALL calc(1+1) -> 2", "check": "2 = 2 -> pass: both sides equal: 2 vs 2"}


def test_branches_without_steps_are_stopped_in_a_graph():
    assert run_graph("<ACTION> CALL calc(6*7)") == {"action": "CALL calc(6*7) -> 42"}
