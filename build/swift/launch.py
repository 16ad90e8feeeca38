"""Run one Swift server with swift.conf taken from our state dir instead of /etc/swift.

Swift hard-codes /etc/swift/swift.conf (swift.common.utils.SWIFT_CONF_FILE); its readers
look the attribute up at call time, so setting it before the servers' modules are imported
keeps the all-in-one away from the machine's /etc.
Usage: launch.py SWIFT_CONF SERVER CONF_FILE [-v]     (SERVER: proxy-server, object-server, ...)
"""

import importlib
import sys


def main() -> int:
    swift_conf, server = sys.argv[1], sys.argv[2]
    sys.argv = [f"swift-{server}", *sys.argv[3:]]
    utils = importlib.import_module("swift.common.utils")
    utils.SWIFT_CONF_FILE = swift_conf
    # Imported only now: swift.common.constraints reads swift.conf when it is first imported.
    wsgi = importlib.import_module("swift.common.wsgi")
    conf_file, options = utils.parse_options()
    return int(wsgi.run_wsgi(conf_file, server, **options) or 0)


if __name__ == "__main__":
    sys.exit(main())
