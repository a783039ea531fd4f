"""The nightly job (`cm-nightly`): the work dir and its reuse rules (`work_dir`), one run
per work dir and batch (`lease`), and the batch report (`report`).
"""
