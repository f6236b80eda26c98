from lav2cli.cli import main

main()
