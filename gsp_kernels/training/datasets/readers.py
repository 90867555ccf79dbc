"""The four benchmarks' archive readers: each finds its files under the dataset root (the
folder the archive was extracted into, or the archive's top folder) and returns the
benchmark's splits as ``ImageListDataset``s, ``LOADERS[name](root, train_tf, test_tf) ->
(train, query, gallery or None)``.

Layouts and splits (one module each):

- ``cub`` (``cub.py``): ``CUB_200_2011/{images.txt, image_class_labels.txt, images/}``;
  classes 1-100 train, 101-200 test (pytorch-metric-learning's ``CUB`` parses it).
- ``cars196`` (``cars.py``): the classic release (``cars_annos.mat`` next to ``car_ims/``,
  read with scipy; the ``test`` flag is ignored) or the layout distributed today
  (``names.csv``, ``anno_train.csv``, ``anno_test.csv``, ``car_data/car_data/{train,test}/<class>/``,
  parsed by pytorch-metric-learning's ``Cars196``); classes 1-98 train, 99-196 test.
- ``sop`` (``sop.py``): ``Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt}`` define
  the split (pytorch-metric-learning's ``StanfordOnlineProducts`` parses them).
- ``inshop`` (``inshop.py``): ``list_eval_partition.txt`` (under ``Eval/`` or at the root) and
  ``img/`` (at the root or under ``Img/``): train on ``train``, evaluate ``query`` against
  ``gallery``.

Every line of every annotation file is checked before a split is built, pytorch-metric-learning's
parsers included (``annotations.py``): a malformed line, an unknown value, an id or image given
twice, or an image path that does not resolve inside the benchmark's folder (absolute, ``..``
climbing out, a symbolic link pointing out) is an ``AnnotationError`` (a ``LayoutError``)
naming the file and the line.
"""

from __future__ import annotations

from .annotations import AnnotationError, check_root
from .cars import CARS_KAGGLE_FOLDER, CARS_TRAIN_CLASSES, load_cars
from .cub import CUB_FOLDER, load_cub
from .inshop import INSHOP_FOLDER, load_inshop
from .sop import SOP_FOLDER, load_sop

LOADERS = {"cub": load_cub, "cars196": load_cars, "sop": load_sop, "inshop": load_inshop}

__all__ = ["CARS_KAGGLE_FOLDER", "CARS_TRAIN_CLASSES", "CUB_FOLDER", "INSHOP_FOLDER", "LOADERS", "SOP_FOLDER",
           "AnnotationError", "check_root"]
