from services.records.app import service

service.main()
