"""A client for Alipay's legacy global barcode API (MAPI).

It knows nothing of kiosks: it builds, signs, sends and verifies MAPI calls and returns typed
results. Another gateway (Antom) can sit beside it behind the same shape later.
"""
