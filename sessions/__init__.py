"""Sessions: training, data, experiment running and the ``engram`` CLI (the top layer).

Nothing imports ``sessions``; it may import every other package (kernels, mhc, memory_store,
engram).
"""
