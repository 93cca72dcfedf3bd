"""The rank side of the distributed tests: tests/test_X.py runs its scenarios from ranks/X.py.

Spawned ranks (distributed.run_ranks, which pickles a function by reference) and mpirun's ranks
(distributed.mpi_ranks("ranks.X:function")) import these as ``ranks.X``, with tests/ on sys.path.
"""
