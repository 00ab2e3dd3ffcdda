"""The dataset of tests/launch/ray_worker.py, in a module Ray's workers can import."""

import torch
from torch.utils.data import Dataset

N, SIZE, CLASSES = 16, 32, 3


class Images(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(N, 3, SIZE, SIZE, generator=g)
        self.labels = torch.arange(N) % CLASSES
        self.classes = ["cat", "dog", "bird"]

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])
