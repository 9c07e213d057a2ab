"""Training-framework callbacks that post to the session's Google Chat thread.

Each lives in its own module and imports its framework when *that module* is
imported, never before: ``import chat_magic`` (and ``import
chat_magic.integrations``) imports no framework.

- :mod:`chat_magic.integrations.lightning` -- ``ChatCallback`` for Lightning 2.x
  (``lightning`` and ``pytorch_lightning``)
- :mod:`chat_magic.integrations.keras` -- ``ChatCallback`` for Keras 3 (any backend)
- :mod:`chat_magic.integrations.transformers` -- ``ChatCallback``, a ``TrainerCallback``
  for the Hugging Face ``Trainer``
- :mod:`chat_magic.integrations.ray` -- ``ChatCallback`` for Ray Train (``RunConfig(callbacks=...)``)
  and Ray Tune (``tune.RunConfig(callbacks=...)``): one thread per experiment

All take the same options (see :class:`chat_magic.integrations._base.TrainingWatch`)::

    ChatCallback(label=None, *, to=None, mention=None, on="epoch", every_n_epochs=1,
                 every_n_steps=None, progress_every=300, metrics=None, thread_key=None,
                 cards=True, ranks=None)
"""

__all__: list[str] = []
