"""Input pipelines: TFDS `data_source` (no TensorFlow) + NumPy / grain.

* In-memory datasets (`mnist`, `cifar10`, `cifar100`): `create_pipeline`
  decodes a split once (cached `.npz`), and yields uint8 batches whose order
  is a pure function of `(seed, epoch, step)`; augmentation + normalization
  run on device via `pipeline.preprocess_fn()` inside the compiled step.
* `imagenet2012`: `imagenet_pipeline` (grain `MapDataset` with worker
  processes, per-record JPEG decode + random-resized-crop on the host).

Both expose an iterator whose position `{'epoch', 'step'}` is JSON and goes
into the checkpoint for exact resume.
"""

from kd_jax.data.augment import (AUG_TAG, augment_batch, make_preprocess_fn,
                                 normalize, random_crop_flip,
                                 random_translate)
from kd_jax.data.imagenet import (GrainBatchIterator, GrainImagePipeline,
                                  imagenet_pipeline)
from kd_jax.data.mnist import load_mnist_arrays, normalize_mnist
from kd_jax.data.pipeline import (BatchIterator, InMemoryPipeline,
                                  check_position, create_pipeline,
                                  epoch_permutation, same_class_partners)
from kd_jax.data.subsets import (class_subset, split_validation,
                                 transfer_set)
from kd_jax.data.sources import (DATASETS, DatasetInfo, DatasetNotFoundError,
                                 dataset_info, load_arrays)
