"""Mamba's selective scan: naive.py, chunked.py (torch ops over the linear scan), native.py (C, forward and backward)."""
