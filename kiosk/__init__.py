"""Alipay barcode payment firmware for unattended vending kiosks."""

__version__ = "0.1.0"
