# -*- coding: utf-8 -*-
# vim: ft=sls
# Remove studio-agent: stop the service, then purge the package (credentials, state and the
# system user go with it: debian/studio-agent.postrm).
---
include:
  - .service.clean
  - .config.clean
  - .package.clean
