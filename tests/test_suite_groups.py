"""The suite's xdist groups reach the scheduler: a module marked xdist_group runs on one worker,
so its module-scoped export is made once (pytest 9.2 with xdist 3.8 dropped the groups silently
and every grouped export ran on both workers)."""
import pytest

pytestmark = pytest.mark.xdist_group("suite_groups")


def test_a_grouped_test_carries_its_group_to_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("run without xdist's --dist loadgroup: there are no groups to check")
    assert request.node.nodeid.endswith("@suite_groups"), (
        f"{request.node.nodeid}: xdist did not tag this test with its group, so --dist loadgroup spreads "
        "grouped tests over workers (check the pytest / pytest-xdist pins in constraints/ci.txt)")
