"""latenthash.export: the PyTorch side (train, evaluate, export). Needs `pip install 'latenthash[train]'`."""
