"""The pipelined order of the online loop, for tests on the CPU and the GPU alike."""


def pipelined_steps(engine, thetas):
    """LCA of each step θ_t → θ_{t+1} of ``thetas`` in train.py's order: step t+1 is launched before step
    t's ``result()`` is read. Returns the list of ``StepLCA`` and the last ``PendingStep``."""
    got, pending = [], None
    for a, b in zip(thetas[:-1], thetas[1:]):
        nxt = engine.launch(a, b)
        if pending is not None:
            got.append(pending.result())
        pending = nxt
    got.append(pending.result())
    return got, pending
