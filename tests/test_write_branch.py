"""backends/onnx/write_branch.py: the nodes that only the written memory needs move into an If on
the segment's end; what the other outputs read stays outside, and onnxruntime gives the same
values on both branches. The exported decode step has that If (its stream exactness is
tests/test_decode_graph.py's)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from wavefront.backends.onnx.write_branch import write_on_segment_end

ort = pytest.importorskip("onnxruntime")


def _graph():
    """logits = 2x + 1; present = Where(end, 2x * m + relu(m), m): 2x is shared, the rest only writes."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two_t", f, [], [2.0])),
             helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one_t", f, [], [1.0])),
             helper.make_node("Mul", ["x", "two"], ["shared"]),
             helper.make_node("Add", ["shared", "one"], ["logits"]),
             helper.make_node("Mul", ["shared", "m"], ["sm"]),
             helper.make_node("Relu", ["m"], ["rm"]),
             helper.make_node("Add", ["sm", "rm"], ["written"]),
             helper.make_node("Where", ["end", "written", "m"], ["present"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2]),
                                       helper.make_tensor_value_info("m", f, [2]),
                                       helper.make_tensor_value_info("end", TensorProto.BOOL, [1])],
                          [helper.make_tensor_value_info("logits", f, [2]),
                           helper.make_tensor_value_info("present", f, [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto, end: bool):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": np.array([1.0, -2.0], np.float32), "m": np.array([-1.0, 3.0], np.float32),
             "end": np.array([end])}
    return session.run(None, feeds)


def test_only_what_the_write_alone_needs_moves_and_both_branches_give_the_same_values():
    plain = _graph()
    moved = _graph()
    assert write_on_segment_end(moved, "end", ["present"]) == 3  # the second Mul, the Relu, the Add
    onnx.checker.check_model(moved, full_check=True)
    (branch,) = [n for n in moved.graph.node if n.op_type == "If"]
    assert "shared" in {o for n in moved.graph.node for o in n.output}  # the logits read it: it stays outside
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Mul", "Relu", "Add", "Identity"]  # the output made in the branch
    for end in (True, False):
        for got, want in zip(_run(moved, end), _run(plain, end)):
            np.testing.assert_array_equal(got, want)


def test_a_present_not_made_by_a_where_on_the_condition_leaves_the_graph_as_it_was():
    proto = _graph()
    before = proto.SerializeToString()
    assert write_on_segment_end(proto, "another_condition", ["present"]) == 0
    assert proto.SerializeToString() == before


def _with_second_present(read_present: bool):
    """_graph() plus present2 = Where(end, shared, m): its written value is one the logits read too;
    with read_present, another output reads the first present."""
    proto = _graph()
    g = proto.graph
    f = TensorProto.FLOAT
    g.node.append(helper.make_node("Where", ["end", "shared", "m"], ["present2"]))
    g.output.append(helper.make_tensor_value_info("present2", f, [2]))
    if read_present:
        g.node.append(helper.make_node("Neg", ["present"], ["negated"]))
        g.output.append(helper.make_tensor_value_info("negated", f, [2]))
    return proto


def test_a_written_value_computed_outside_passes_through_the_branch():
    moved = _with_second_present(read_present=False)
    assert write_on_segment_end(moved, "end", ["present", "present2"]) == 3
    onnx.checker.check_model(moved, full_check=True)
    for end in (True, False):
        for got, want in zip(_run(moved, end), _run(_with_second_present(read_present=False), end)):
            np.testing.assert_array_equal(got, want)


def test_a_graph_where_a_node_reads_a_present_is_left_as_it_was():
    proto = _with_second_present(read_present=True)
    before = proto.SerializeToString()
    assert write_on_segment_end(proto, "end", ["present", "present2"]) == 0
    assert proto.SerializeToString() == before
