"""The lowest layer: facts that data, models and metrics all read, importing none of them.

- presets.py: the model presets and the data sizes that go with each (torch-free);
- moments.py: the columns of the Stage2 mask moments (model input and logged metrics).

Layering, lowest first: common < data < models < metrics < training; a module imports only
from its own layer or lower ones (tests/test_layout.py checks the folder graph has no cycle).
"""
