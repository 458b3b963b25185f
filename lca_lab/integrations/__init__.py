"""LCA inside training loops that are not lca_lab's (docs/integrations.md), three faces of one core
(:class:`~lca_lab.integrations.session.LCASession`):

* :func:`lca_lab.track` (:mod:`.track`): any loop, a ``with`` block and ``lca.step()``;
* :class:`~lca_lab.integrations.lightning.LCACallback`: PyTorch Lightning (``lca_lab[lightning]``);
* :class:`~lca_lab.integrations.hf.LCATrainerCallback`: the Hugging Face Trainer (``lca_lab[hf]``).

Importing this package imports neither Lightning nor transformers; their modules do, when imported.
"""
