"""First-order linear scans h_t = a_t h_{t-1} + b_t: naive.py, chunked.py, native.py (C), triton.py, dispatch.py (linear_scan)."""
