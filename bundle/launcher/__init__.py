"""The launcher behind ``1键推理.sh``: preflight, install, the configuration, process control.

Every module here runs on the platform's bare Python, before anything is installed, and so uses
the standard library only; what needs the app's libraries (the schema, the engine registry, the
model checks) is asked of ``python -m bundle.resolve`` in a Python that has them (config.py
explains which Python, and how the location of the venv — itself a manifest key — is found).

    output.py     messages and the Stop exception          app.py      the app folder, child env
    preflight.py  machine checks (GPU, nvcc, disk, port)   config.py   resolve calls, the bootstrap Python
    lock.py       the install lock (two launches at once)  venv.py     venv creation, its failures
    install.py    install plan → pip steps, stamp          process.py  server start/stop/status
    commands.py   start, doctor, the command line          usage.py    --help
"""
