"""The pipelined order of the online loop, for tests on the CPU and the GPU alike."""

from lca_lab.loop import LCADriver


class _Collect:
    """A recorder that keeps each step's result (and the last step's handle)."""

    def __init__(self):
        self.steps, self.last = [], None

    def record(self, launched):
        self.last = launched.handle
        st = launched.handle.result()
        self.steps.append(st)
        return st


def pipelined_steps(engine, thetas):
    """LCA of each step θ_t → θ_{t+1} of ``thetas`` in the training loop's order (``lca_lab.loop``'s
    driver): step t+1 is launched before step t's ``result()`` is read. Returns the list of ``StepLCA``
    and the last ``PendingStep``."""
    rec = _Collect()
    driver = LCADriver(engine, rec)
    driver.run(driver.follow(thetas))
    return rec.steps, rec.last
