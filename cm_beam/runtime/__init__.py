"""Where pipelines run: runner options and aliases (`runner`), BLAS threads per worker
(`worker_threads`), glibc malloc tuning for local runs (`malloc_tuning`) and the Dask
runner with cm-beam's fixes (`dask_runner`).
"""
