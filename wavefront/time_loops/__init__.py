"""The time-loop route, in the order it runs: source.py finds `for t in range(...)` loops in a
module's methods and rewrites the function to hand them to a runner; affine_carry.py,
matrix_state.py and index_hoist.py analyse a loop body (is it affine in its carry, a matrix
state, which reads can be hoisted); runner.py (LoopRunner) runs a loop as a scan on the kernels
of backends/scans; model.py (LoopLiftedModel) finds the loops of a model and installs the
rewritten methods for each call."""
