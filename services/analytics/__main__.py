from services.analytics.app import service

service.main()
