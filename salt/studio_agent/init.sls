# -*- coding: utf-8 -*-
# vim: ft=sls
# Install, configure and run studio-agent: salt-call state.apply studio_agent
---
include:
  - .package
  - .apptainer
  - .config
  - .service
