#!/bin/bash -e
# pi-gen, inside the root: Debian packages, the /opt/kiosk venv from the staged wheels, the
# kiosk user; ModemManager and compilers go. Same code as the Debian image's layer.

bash /var/cache/kiosk-layer/kiosk-layer.sh --inside
