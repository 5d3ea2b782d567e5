"""Augmented views: how a view is drawn, stored and replayed.

A view recipe (:mod:`~kdcache.views.recipe`: crop and flip, the draw order, the per-view
parameter arrays a cache stores, the rendering to a model's input) and the augmentation ops
beyond it (:mod:`~kdcache.views.augment`: RandAugment/TrivialAugment policies, colour jitter,
erasing, Mixup/CutMix), with :mod:`~kdcache.views.kernels` standing in, pixel for pixel, for the
torchvision kernels whose per-call set-up costs more than their pixels on small images (the
geometric ops, Equalize). Precompute draws views from a seed; training replays the stored ones.

Imports: ``kdcache.core`` only.
"""
