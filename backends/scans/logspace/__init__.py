"""Running-max-stabilised exponential-gate scans (RWKV-4 WKV, xLSTM mLSTM): naive.py, chunked.py."""
