"""Models: building teachers and students, their weights and how they see views.

Building from timm, torchvision or TorchScript with a checkpoint (:mod:`~kdcache.models.build`,
:mod:`~kdcache.models.weights`), a model's rendering of views (:mod:`~kdcache.models.preprocess`),
running it in batches with autocast (:mod:`~kdcache.models.runner`) and ensembles of models
stored as one teacher (:mod:`~kdcache.models.ensemble`).

Imports: the contract below it (``core``, ``views``, ``targets``, ``cache``).
"""
