"""Equilibrium propagation, one plugin package: the `eqformer` model family (a weight-tied block
iterated to a fixed point), the `ep` optimizer (EP's gradient estimate, or the exact BPTT and
implicit controls, then AdamW) and the `ep` diagnostics metric, on the relaxation machinery they
share (`relaxation`)."""
