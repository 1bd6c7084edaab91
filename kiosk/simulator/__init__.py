"""The Alipay MAPI gateway simulator: a faithful gateway on loopback with a ledger and faults.

Used by the payment flow's tests, `kiosk demo` and technicians' rigs; see docs/simulator.md.
"""

from kiosk.simulator.faults import SEED_ERROR_CODES, Fault, FaultPlan, plan_for_code
from kiosk.simulator.gateway import GatewaySimulator, MerchantAccount, SeenRequest, SentAnswer
from kiosk.simulator.ledger import Ledger, Trade, TradeStatus

__all__ = [
    "SEED_ERROR_CODES",
    "Fault",
    "FaultPlan",
    "GatewaySimulator",
    "Ledger",
    "MerchantAccount",
    "SeenRequest",
    "SentAnswer",
    "Trade",
    "TradeStatus",
    "plan_for_code",
]
